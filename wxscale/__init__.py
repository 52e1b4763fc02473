"""wxscale: scaling-law studies for Vision-Transformer weather models."""

__version__ = "0.1.0"
