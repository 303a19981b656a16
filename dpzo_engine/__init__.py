"""dpzo-engine: differentially private zeroth-order fine-tuning at inference memory.

The Python API (README, "Python API"): ``PrivateZO`` (sample, step, ε, state), ``ZOOptions``,
``StageOptions`` and ``PrivacyPlan``. They load on first use, so ``import dpzo_engine`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "PrivateZO": "dpzo_engine.zo.private_zo",
    "ZOOptions": "dpzo_engine.zo.private_zo",
    "StageOptions": "dpzo_engine.zo.stagewise",
    "StepRecord": "dpzo_engine.zo.step",
    "PrivacyPlan": "dpzo_engine.privacy.plan",
    "FlatParams": "dpzo_engine.core.flat",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dpzo_engine' has no attribute {name!r}")
