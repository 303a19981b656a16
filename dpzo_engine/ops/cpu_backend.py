"""C++/OpenMP CPU backend: JIT-builds ``csrc/`` on first use and calls it.

The extension is built with ninja through ``torch.utils.cpp_extension.load`` into torch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so only
the first use after a source change pays the compile (~1 minute on 2 cores).  The flags
matter for exactness: ``-ffp-contract=off`` keeps every ``a*b + c`` two roundings (no FMA),
and there is no ``-ffast-math``, so results match the PyTorch reference bit for bit.

The stream kernels are compiled three times (scalar, AVX2, AVX-512, each in its own
translation unit) and the best one the CPU supports runs; ``DPZO_CPU_ISA`` or ``set_isa``
forces one (all give the same bits).  Threads follow ``torch.get_num_threads()``; results
do not depend on the thread count either.
"""

from __future__ import annotations

import os
import shutil
import threading
from types import ModuleType

import torch

from ..core import stream

EXTENSION_NAME = "dpzo_cpu"
SOURCES = ("dpzo_cpu.cpp", "isa_scalar.cpp", "isa_avx2.cpp", "isa_avx512.cpp")
# ninja's depfiles rebuild on changes to these
HEADERS = (
    "kernels_api.h",
    "stream_kernels.inc",
    "stream_dispatch.inc",
    "simd_scalar.inc",
    "simd_avx2.inc",
    "simd_avx512.inc",
    "simd_ways.inc",
)
ISAS = ("scalar", "avx2", "avx512")
# -fno-math-errno only lets sqrt vectorise (results are unchanged); never -ffast-math.
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None  # a failed build is not retried in the same process


def _unavailable(reason: str):
    from . import BackendUnavailable  # imported late: ops/__init__ imports this module lazily

    return BackendUnavailable(f"C++ CPU kernels unavailable: {reason}")


def _find_compiler() -> str | None:
    """The compiler torch's builder will call: ``$CXX``, else ``c++``."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _build() -> ModuleType:
    """Compile (or load from torch's cache) the extension; raise a one-line reason on failure."""
    from torch.utils import cpp_extension

    if _find_compiler() is None:
        raise _unavailable("no C++ compiler found (install g++, or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise _unavailable("ninja not found (pip install ninja)")
    try:
        import dpzo_csrc
    except ImportError as exc:
        raise _unavailable(f"C++ sources not installed ({exc}); reinstall dpzo-engine") from exc
    sources = [str(dpzo_csrc.SOURCE_DIR / name) for name in SOURCES]
    missing = [str(dpzo_csrc.SOURCE_DIR / name) for name in SOURCES + HEADERS]
    missing = [path for path in missing if not os.path.exists(path)]
    if missing:
        raise _unavailable(f"C++ sources missing: {', '.join(missing)}")
    try:
        return cpp_extension.load(
            name=EXTENSION_NAME,
            sources=sources,
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            verbose=os.environ.get("DPZO_VERBOSE_BUILD", "0") == "1",
        )
    except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError/OSError
        lines = str(exc).strip().splitlines()
        detail = lines[0][:160] if lines else type(exc).__name__  # torch puts whole compiler commands here
        raise _unavailable(f"build failed ({detail}); set DPZO_VERBOSE_BUILD=1 to see the compiler output") from exc


def load() -> ModuleType:
    """The compiled extension module, built once per process (thread-safe)."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            if _error is not None:
                raise _unavailable(_error)
            try:
                _module = _build()
            except Exception as exc:
                _error = str(exc).removeprefix("C++ CPU kernels unavailable: ")
                raise
    return _module


def ensure_available() -> None:
    """Raise ``BackendUnavailable`` (one line, with the reason) if the kernels cannot be built."""
    load()


def isa() -> str:
    """The instruction-set build the kernels run now: ``scalar``, ``avx2`` or ``avx512``."""
    return load().isa()


def available_isas() -> list[str]:
    """The builds this CPU can run (``scalar`` always)."""
    return list(load().available_isas())


def set_isa(name: str) -> None:
    """Force a build (``auto`` = the best available); raises ``ValueError`` if this CPU lacks it."""
    if name != "auto" and name not in available_isas():
        raise ValueError(f"this CPU cannot run the {name!r} kernels; available: {available_isas()}")
    load().set_isa(name)


def directions(
    seed: int, offset: int, count: int, kind: str, device=None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Stream values into a new tensor, or into ``out`` (written in place: no allocation)."""
    values = load().directions(stream.to_int64(seed), offset, count, kind == "rademacher", out)
    return values if device is None or out is not None else values.to(device)


def apply_directions(
    buf: torch.Tensor,
    seeds: torch.Tensor,
    coefs: torch.Tensor,
    kind: str,
    offset: int,
    mask: torch.Tensor | None,
    rounding: str,
    rounding_seed: int,
    cache=None,  # ops.DirectionCache, validated by ops
) -> torch.Tensor:
    load().apply_directions(
        buf,
        seeds,
        coefs,
        kind == "rademacher",
        offset,
        mask,
        rounding == "stochastic",
        stream.to_int64(rounding_seed),
        None if cache is None else cache.values,
        -1 if cache is None or cache.read is None else cache.read,
        -1 if cache is None or cache.write is None else cache.write,
    )
    return buf


def clip_aggregate(
    D: torch.Tensor, clip: float, scale: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return load().clip_aggregate(D, clip, scale, mode == "per_direction")
