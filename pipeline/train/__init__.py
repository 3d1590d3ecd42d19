"""Training: the loop, its batches, schedules and metrics log, the export, and the stage command."""
