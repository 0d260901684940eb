"""Memory and communication planner for RevCol training (``python -m revcol_dist.plan``)."""

from .model import PlanInput, make_plan  # noqa: F401
