"""The reversible engine: column inputs are reconstructed from outputs in backward."""

from .function import Segment, run_reversible
from .policy import DriftStats, ReversiblePolicy

__all__ = ["run_reversible", "Segment", "DriftStats", "ReversiblePolicy"]
