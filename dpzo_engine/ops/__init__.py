"""The kernel contracts, one signature for every backend (docs/design.md section 4).

``backend`` is ``"reference"`` (PyTorch, any device), ``"cpu"`` (C++/OpenMP, CPU
tensors), ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or
``"auto"``: Triton for CUDA tensors, C++ for CPU tensors, the reference if the faster
backend is unavailable (with a one-time warning saying why).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from ..core import stream
from ..core.errors import UserError
from . import reference

BACKENDS = ("auto", "reference", "cpu", "triton")
ROUNDINGS = ("nearest", "stochastic")
CLIP_MODES = ("joint", "per_direction")
BUFFER_DTYPES = (torch.float32, torch.bfloat16)
MAX_DIRECTIONS_PER_PASS = 4096

_warned: set[str] = set()


class BackendUnavailable(UserError, RuntimeError):
    """A requested backend cannot run here (no compiler, no Triton, wrong device)."""


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Concrete backend for tensors on ``device``; raises ``BackendUnavailable``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "reference":
        return backend
    if backend == "triton":
        if device.type != "cuda" and not triton_interpreting():
            raise BackendUnavailable("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        from . import triton_backend

        triton_backend.ensure_available()
        return backend
    if backend == "cpu":
        if device.type != "cpu":
            raise BackendUnavailable(f"backend 'cpu' needs CPU tensors, got {device.type}")
        from . import cpu_backend

        cpu_backend.ensure_available()
        return backend
    # auto
    preferred = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "reference"
    if preferred == "reference":
        return preferred
    try:
        return resolve_backend(preferred, device)
    except BackendUnavailable as exc:
        _warn_once(preferred, f"dpzo_engine: {preferred} kernels unavailable ({exc}); using the slow PyTorch reference")
        return "reference"


def _impl(backend: str):
    if backend == "reference":
        return reference
    if backend == "cpu":
        from . import cpu_backend

        return cpu_backend
    from . import triton_backend

    return triton_backend


def _check_kind(kind: str) -> None:
    if kind not in stream.KINDS:
        raise ValueError(f"unknown direction kind {kind!r}; expected one of {stream.KINDS}")


def directions(
    seed: int,
    offset: int,
    count: int,
    kind: str = "gaussian",
    backend: str = "reference",
    device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stream values for indices ``offset .. offset+count-1`` of direction ``seed`` (fp32).

    The same call on every backend; ``seed`` is any int (taken modulo 2**64).  ``out`` (a
    contiguous fp32 tensor of ``count`` elements) receives the values instead of a new tensor;
    its device then decides the backend for ``auto``.
    """
    _check_kind(kind)
    if count < 0 or offset < 0 or offset + count > (1 << 63):
        raise ValueError(f"need 0 <= offset and offset + count <= 2**63; got offset={offset}, count={count}")
    if out is not None:
        if out.dtype != torch.float32 or out.dim() != 1 or not out.is_contiguous() or out.numel() != count:
            raise ValueError(f"out must be a contiguous 1-D float32 tensor of {count} elements")
        device = out.device
    dev = torch.device(device) if device is not None else torch.device("cpu")
    name = resolve_backend(backend, dev)
    impl = _impl(name)
    if name == "cpu":
        return impl.directions(int(seed), int(offset), int(count), kind, device=dev, out=out)
    values = impl.directions(int(seed), int(offset), int(count), kind, device=dev)
    return values if out is None else out.copy_(values)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Pack a bool vector into the kernels' mask: uint8, bit ``i & 7`` of byte ``i >> 3``."""
    keep = keep.reshape(-1).bool()
    n = keep.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=keep.device)
    padded[:n] = keep.to(torch.uint8)
    weights = (1 << torch.arange(8, device=keep.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(mask: torch.Tensor, count: int) -> torch.Tensor:
    return reference.unpack_mask(mask, 0, count)


@dataclass
class DirectionCache:
    """Memory traded for generation: one direction's values kept between passes.

    ``values`` (fp32, contiguous, at most the buffer's length m) covers buffer elements
    ``0 .. m-1``.  ``read = j``: the caller vouches that ``values`` holds direction j's stream
    values there, so a backend may load them instead of generating them; the result is the
    same bits either way (the reference always generates, the C++ kernels load).  ``write =
    j``: on return ``values`` holds direction j's values (``write > read`` when both are set,
    so one pass can leave direction k and enter k + 1).  Gaussian directions on the CPU and
    reference backends only: Rademacher signs cost less to generate than to load.
    """

    values: torch.Tensor
    read: int | None = None
    write: int | None = None


def apply_directions(
    buf: torch.Tensor,
    seeds: torch.Tensor,
    coefs: torch.Tensor,
    kind: str = "gaussian",
    *,
    offset: int = 0,
    mask: torch.Tensor | None = None,
    rounding: str = "nearest",
    rounding_seed: int = 0,
    backend: str = "auto",
    cache: DirectionCache | None = None,
) -> torch.Tensor:
    """In place, in one pass: ``buf[i] <- round(buf[i] + sum_j coefs[j] * z_j[offset + i])``.

    ``seeds`` int64[J] and ``coefs`` fp32[J] are small tensors on ``buf``'s device (no
    recompiles, no host syncs on GPU).  ``mask`` (``pack_mask``) leaves cleared elements
    untouched.  ``rounding='stochastic'`` draws 16 bits per element from Philox keyed by
    ``rounding_seed`` (bf16 buffers; fp32 buffers are exact either way).  ``cache``
    (``DirectionCache``) loads or keeps one direction's values instead of generating them
    again; it never changes the result.  Returns ``buf``.
    """
    _check_kind(kind)
    if buf.dtype not in BUFFER_DTYPES:
        raise TypeError(f"apply_directions supports {BUFFER_DTYPES} buffers, got {buf.dtype}")
    if buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError("apply_directions needs a contiguous 1-D buffer")
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise TypeError("seeds must be a 1-D int64 tensor")
    if coefs.dim() != 1 or coefs.numel() != seeds.numel():
        raise ValueError(f"coefs must be 1-D with one entry per seed ({seeds.numel()}), got {tuple(coefs.shape)}")
    if not 1 <= seeds.numel() <= MAX_DIRECTIONS_PER_PASS:
        raise ValueError(f"J must be in [1, {MAX_DIRECTIONS_PER_PASS}], got {seeds.numel()}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
    if offset < 0 or offset + buf.numel() > (1 << 63):
        raise ValueError(f"offset must be >= 0 with offset + numel <= 2**63, got {offset}")
    if mask is not None:
        if mask.dtype != torch.uint8 or mask.numel() < (buf.numel() + 7) // 8:
            raise ValueError("mask must be a packed uint8 tensor of at least ceil(numel / 8) bytes (see pack_mask)")
        if mask.device != buf.device:
            raise ValueError("mask must be on the buffer's device")
    name = resolve_backend(backend, buf.device)
    if cache is not None:
        _check_cache(cache, buf, seeds.numel(), kind, name)
    if buf.numel() == 0:
        return buf
    impl = _impl(name)
    seeds = seeds.to(buf.device)
    coefs = coefs.to(device=buf.device, dtype=torch.float32)
    seed = stream.to_int64(rounding_seed)
    args = (buf, seeds.contiguous(), coefs.contiguous(), kind, int(offset), mask, rounding, seed)
    return impl.apply_directions(*args) if cache is None else impl.apply_directions(*args, cache=cache)


def _check_cache(cache: DirectionCache, buf: torch.Tensor, num_dirs: int, kind: str, backend: str) -> None:
    values = cache.values
    if kind != "gaussian":
        raise ValueError("a direction cache holds Gaussian directions (Rademacher signs cost less to generate)")
    if backend not in ("cpu", "reference"):
        raise ValueError(f"the direction cache is implemented by the cpu and reference backends, not {backend!r}")
    if values.dtype != torch.float32 or values.dim() != 1 or not values.is_contiguous():
        raise ValueError("DirectionCache.values must be a contiguous 1-D float32 tensor")
    if values.numel() > buf.numel() or values.device != buf.device:
        raise ValueError("DirectionCache.values must lie on the buffer's device and be no longer than the buffer")
    for name, j in (("read", cache.read), ("write", cache.write)):
        if j is not None and not 0 <= j < num_dirs:
            raise ValueError(f"DirectionCache.{name} must index one of the pass's {num_dirs} directions, got {j}")
    if cache.read is not None and cache.write is not None and cache.write <= cache.read:
        raise ValueError("DirectionCache.write must come after DirectionCache.read")


@dataclass
class ClipResult:
    """Output of ``clip_aggregate``: the clipped column sums and the clipping diagnostics."""

    sums: torch.Tensor  # fp64 [K]: sum over examples of clip(scale * D[x, :])
    raw_sums: torch.Tensor  # fp64 [K]: the same without clipping (diagnostics only)
    num_clipped: torch.Tensor  # int64 []: rows whose norm exceeded C
    num_nonfinite: torch.Tensor  # int64 []: rows dropped because of a NaN or inf
    batch_size: int

    @property
    def fraction_clipped(self) -> float:
        return float(self.num_clipped) / self.batch_size if self.batch_size else 0.0

    @property
    def relative_clip_error(self) -> float:
        """||sum a - sum clip(a)|| / ||sum a||: how far clipping bent the batch direction."""
        denom = float(torch.linalg.vector_norm(self.raw_sums))
        if denom == 0.0:
            return 0.0
        return float(torch.linalg.vector_norm(self.raw_sums - self.sums)) / denom


def clip_aggregate(
    D: torch.Tensor, clip: float, scale: float = 1.0, mode: str = "joint", backend: str = "auto"
) -> ClipResult:
    """Per-example clip of the rows of ``D`` [B, K] after multiplying by ``scale``, summed.

    ``mode='joint'`` clips each row's L2 norm to ``clip`` (DP-AggZO, sensitivity C);
    ``'per_direction'`` clips each entry to [-C, C] (ablation, sensitivity C*sqrt(K)).
    No noise here: the privacy mechanism adds it.
    """
    if D.dim() != 2:
        raise ValueError(f"D must be [B, K], got shape {tuple(D.shape)}")
    if mode not in CLIP_MODES:
        raise ValueError(f"unknown clip mode {mode!r}; expected one of {CLIP_MODES}")
    if not (clip > 0 and clip < float("inf")):
        raise ValueError(f"clip must be a positive finite number, got {clip}")
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    B, K = D.shape
    if B == 0:
        zeros = torch.zeros(K, dtype=torch.float64, device=D.device)
        none = torch.zeros((), dtype=torch.int64, device=D.device)
        return ClipResult(zeros, zeros.clone(), none, none.clone(), 0)
    impl = _impl(resolve_backend(backend, D.device))
    sums, raw, n_clip, n_bad = impl.clip_aggregate(D.to(torch.float32).contiguous(), float(clip), float(scale), mode)
    return ClipResult(sums, raw, n_clip, n_bad, B)


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "ClipResult",
    "apply_directions",
    "clip_aggregate",
    "directions",
    "pack_mask",
    "resolve_backend",
    "unpack_mask",
]
