"""The memory model: bytes per device for weights, KV cache, compute buffers and fixed overheads."""
