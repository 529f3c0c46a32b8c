"""The native engine: sequences, scheduling over the paged KV cache, the model runner, tensor parallelism."""
