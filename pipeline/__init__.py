"""gptpipe: a declarative, reproducible DVC + DeepSpeed pipeline for GPT-style language models."""
