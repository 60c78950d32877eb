"""nsa-viz: see and measure native sparse attention on real models."""
from .patterns import BlockSparse, Custom, Dense, Dilated, GlobalLocal, NSA, Pattern, SlidingWindow
from .models import apply_pattern, load_model, remove_pattern
from .capture import Recording, capture, recall_table, selection_stats

__version__ = "0.1.0"
__all__ = ["Pattern", "Dense", "SlidingWindow", "Dilated", "GlobalLocal", "Custom", "BlockSparse", "NSA",
           "load_model", "apply_pattern", "remove_pattern", "capture", "Recording", "recall_table", "selection_stats"]
