"""revcol-dist: a distributed trainer for Reversible Column Networks."""

__version__ = "0.1.0"
