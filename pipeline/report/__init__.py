"""The report stage: curves, metrics and samples on one page."""
