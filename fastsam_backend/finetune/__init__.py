"""Opt-in FastSAM fine-tuning per project: training, its data set, the decisions, the adopted checkpoints."""
