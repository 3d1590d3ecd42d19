"""Models: built from scratch or loaded (with the dtype policy), loaded for inference, and generation."""
