"""Checkpoints to models: GGUF and safetensors readers, the one loading function, the tokenizer."""
