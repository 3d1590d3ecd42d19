"""Checkpoints: a run folder and its identity, step folders (save, verify, load, prune), their state.json,
DeepSpeed's files in them and elastic conversion."""
