"""labpal_fast: a fast, sync-free PyTorch implementation of the LABPAL optimizer."""
from ._support import warn_if_unsupported

warn_if_unsupported()  # torch / Python outside the tested ranges: say so once

from .optimizer import LABPAL  # noqa: E402

__all__ = ["LABPAL"]
__version__ = "0.1.0"
