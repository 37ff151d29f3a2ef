"""llamasplit server: OpenAI-compatible HTTP server loading GGUF models with the tuner's plan."""
