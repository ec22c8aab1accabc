"""SAIL: sparse autoencoders for interpretable medical image representations."""

__version__ = "0.1.0"
