"""Tokenizing: the tokenizers (tiktoken, char, bpe, hf) and the stage that writes token shards."""
