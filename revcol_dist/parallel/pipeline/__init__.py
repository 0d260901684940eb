"""Column pipeline parallelism: RevCol's columns split over stages, 1F1B over micro-batches,
combined with data parallelism. See docs/pipeline.md for why the schedule is our own."""

from .engine import PipelineEngine
from .partition import column_costs, partition_table, split_columns
from .schedule import bubble_fraction, one_f_one_b

__all__ = ["PipelineEngine", "column_costs", "split_columns", "partition_table", "one_f_one_b", "bubble_fraction"]
