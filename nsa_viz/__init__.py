"""nsa-viz: see and measure native sparse attention on real models."""
from .patterns import BlockSparse, Custom, Dense, Dilated, GlobalLocal, NSA, Pattern, SlidingWindow

__version__ = "0.1.0"
__all__ = ["Pattern", "Dense", "SlidingWindow", "Dilated", "GlobalLocal", "Custom", "BlockSparse", "NSA"]
