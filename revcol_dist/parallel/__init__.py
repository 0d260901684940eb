"""Parallelism applied to plain models: DeepSpeed ZeRO, DDP, pipeline, offload."""
