"""megacpm: a 3D-parallel training engine for MiniCPM-family language models."""

__version__ = "0.1.0"
