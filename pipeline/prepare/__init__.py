"""Preparing the corpus: sources, input formats, the plan of each document's fate, the stage, and reading the
prepared documents back."""
