"""Distribution and hardware: DeepSpeed's engine, the process group and collectives, the launcher, peak FLOP/s."""
