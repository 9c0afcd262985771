"""From a model name to a served model: the model catalog and cache, LoRA adapters, GGUF
export, llama.cpp (its safety check and self-test child) and `serving.resolve`."""
