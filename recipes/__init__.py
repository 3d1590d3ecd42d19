"""The shipped recipes: complete params files, read with `gptpipe recipe list|show|use` (see pipeline/tools/recipes.py)."""
