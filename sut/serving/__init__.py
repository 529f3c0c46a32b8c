"""`wallperf serve`: the OpenAI-compatible server over the native engine, its limits and request parsing."""
