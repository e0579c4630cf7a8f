"""Training: the loop, checkpoints, metrics and the command line."""
