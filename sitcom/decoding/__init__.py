"""From tokens to script lines: vocabulary facts, guards, sampling, the batch plan, the two
decoding loops (transformers' generate() and llama.cpp continuous batching), streaming and
thread counts."""
