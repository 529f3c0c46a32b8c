"""Quantization: fp8 weights (the offline pass, runtime modules, the saved form) and fp8 KV-cache calibration."""
