"""The sample stage: texts from the trained model."""
