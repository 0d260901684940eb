"""The reversible engine: column inputs are reconstructed from outputs in backward."""

from .function import ReversibleColumns, run_reversible
from .policy import DriftStats, ReversiblePolicy

__all__ = ["ReversibleColumns", "run_reversible", "DriftStats", "ReversiblePolicy"]
