"""labpal_fast: a fast, sync-free PyTorch implementation of the LABPAL optimizer."""
from .optimizer import LABPAL

__all__ = ["LABPAL"]
__version__ = "0.1.0"
