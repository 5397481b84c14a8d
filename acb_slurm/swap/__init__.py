"""The swap engine (storage-level offload/onload) and the automatic PyTorch mode built on it."""

from acb_slurm.swap.engine import SwapEngine, SwapError, SwapState, SwapStats, SwapWarning

__all__ = ["SwapEngine", "SwapError", "SwapState", "SwapStats", "SwapWarning"]
