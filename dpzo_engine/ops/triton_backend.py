"""Triton backend: thin adapters from the ``dpzo_engine.ops`` contracts to ``dpzo_triton``.

CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).  ``dpzo_triton`` is
imported inside the functions, never at module import: Triton reads the interpreter flag
when a ``triton.jit`` function is created, so importing it early would freeze the mode.
Arguments arrive validated by ``dpzo_engine.ops``.
"""

from __future__ import annotations

import functools

import torch

from ..core import stream


def ensure_available() -> None:
    """Raise ``BackendUnavailable`` (one line, with the reason) if Triton cannot be used."""
    from . import BackendUnavailable, triton_interpreting

    try:
        import triton
        import triton.language
    except Exception as exc:  # ImportError, or a broken install raising something else
        raise BackendUnavailable(f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton") from exc
    try:
        import dpzo_triton.apply_directions  # noqa: F401
    except Exception as exc:
        raise BackendUnavailable(
            f"dpzo_triton kernels are not importable ({type(exc).__name__}: {exc}); reinstall dpzo-engine"
        ) from exc
    if triton_interpreting() and (problem := _interpreter_problem()):
        import numpy

        raise BackendUnavailable(
            f"Triton {triton.__version__}'s interpreter cannot run the kernels with numpy {numpy.__version__} "
            f"({problem}); use Triton >= 3.9, or numpy < 2.4, or CUDA tensors"
        )


@functools.cache
def _interpreter_problem() -> str | None:
    """Checked once per process: see dpzo_triton.interpreter_check."""
    from dpzo_triton.interpreter_check import runtime_loop_problem

    return runtime_loop_problem()


def directions(seed: int, offset: int, count: int, kind: str, device: torch.device | str | None = None) -> torch.Tensor:
    from dpzo_triton.directions import directions as _directions

    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _directions(stream.to_int64(seed), offset, count, kind, dev)


def apply_directions(
    buf: torch.Tensor,
    seeds: torch.Tensor,
    coefs: torch.Tensor,
    kind: str,
    offset: int,
    mask: torch.Tensor | None,
    rounding: str,
    rounding_seed: int,
) -> torch.Tensor:
    from dpzo_triton.apply_directions import apply_directions as _apply

    return _apply(buf, seeds, coefs, kind, offset, mask, rounding, stream.to_int64(rounding_seed))


def clip_aggregate(
    D: torch.Tensor, clip: float, scale: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from dpzo_triton.clip_aggregate import clip_aggregate as _clip_aggregate

    return _clip_aggregate(D.contiguous(), clip, scale, mode)
