"""Placement executors: growth applied where the training state lives (tensor-parallel shards, ...)."""
