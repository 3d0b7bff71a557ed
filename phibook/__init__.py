"""phibook: the phi-1.5 recipe end to end, from synthetic textbooks to served models."""

__version__ = "0.1.0"
