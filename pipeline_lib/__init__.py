"""DP image classification from pre-trained features."""

__version__ = "0.1.0"
