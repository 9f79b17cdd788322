"""Optional adapters to training frameworks (README, "Training loops and frameworks").

Import the one you use; each imports its framework only then, and without it raises
ImportError naming what to install (`pip install 'labpal-fast[integrations]'`):

- `labpal_fast.integrations.lightning`: Lightning's automatic optimization (`LABPALCallback`)
- `labpal_fast.integrations.hf`: Hugging Face `Trainer` (`LABPALTrainer`) and Accelerate
- `labpal_fast.integrations.tensorboard`: the measurements as TensorBoard scalars
"""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL = "pip install 'labpal-fast[integrations]'"


def require(module: str, package: str, integration: str) -> ModuleType:
    """Imports `module` or raises ImportError naming the package and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"labpal_fast.integrations.{integration} needs the {package!r} package ({exc}); "
            f"install it with `{INSTALL}` (or `pip install {package}`)") from exc


def unwrap(opt):
    """The LABPAL inside a framework's wrapper (Accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer: both keep it as `.optimizer`), or TypeError."""
    from ..optimizer import LABPAL

    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, LABPAL):
        return inner
    if not isinstance(opt, LABPAL):
        raise TypeError(f"expected a LABPAL optimizer (or a wrapper of one), got {type(opt).__name__}")
    return opt
