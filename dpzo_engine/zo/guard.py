"""Numerical guards of a ZO run: a λ whose restore would lose the weights, and a run that diverges.

**λ up front** (``check_perturbation_scale``). Each pass computes round(θ + λz). Where λ|z| is far above
|θ| the rounding grid is that of λ|z|, and restoring (−λz) returns θ with only the bits above that
grid: once 4λ (|z| ≤ 4 for all but 6e-5 of Gaussian draws) reaches 2^(p/2) times the rms of the
trainable weights, a typical weight keeps fewer than half of its p significant bits per pass (p = 24
for float32, 8 for bfloat16, 11 for float16). Such a λ is refused before anything runs.
``--zo-eps 1e30`` on float32 weights of rms 0.05 would keep none of them.

**Divergence** (``DivergenceGuard``, after every step). A step fails if one of its update
coefficients is not finite (lr × released value overflowed float32), or if θ afterwards is not
finite, or if its rms exceeds ``max_growth`` × max(rms θ₀, λ) (the band: 1000 by default).
Float32 weights that grow a thousandfold during fine-tuning have left the model's range: the forward
passes turn to inf, their rows are dropped, and the steps release pure noise. The check costs one read
of θ per step. It reads only public values (θ is a function of the released coefficients), so stopping
reveals nothing about the data; the training loss is private and is therefore not used to stop.
The caller writes nothing of a step that fails: the ledger, metrics and checkpoints end at the last
good step, and the last checkpoint stays intact.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import ConfigError, TrainingDiverged
from ..core.flat import FlatParams

GAUSSIAN_BOUND = 4.0  # |z| of a standard Gaussian exceeds 4 with probability 6.3e-5
SIGNIFICAND_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11, torch.float64: 53}
DEFAULT_MAX_GROWTH = 1000.0
CHUNK = 1 << 24  # elements per reduction: bounds the float64 temporary (128 MiB)


def sum_of_squares(flat: FlatParams) -> float:
    """Σθ² over the trainable buffers in float64: finite exactly when every element is (one read of θ)."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for buf in flat.buffers:
        for start in range(0, buf.numel(), CHUNK):
            chunk = buf[start : start + CHUNK].to(torch.float64)
            total += torch.dot(chunk, chunk)
    return float(total)


def rms(flat: FlatParams) -> float:
    return math.sqrt(sum_of_squares(flat) / max(flat.numel, 1))


def max_perturbation(flat: FlatParams) -> float:
    """The largest λ a run on these weights may use (inf when all trainable weights are zero)."""
    scale = rms(flat)
    if scale == 0:
        return math.inf
    bits = min(SIGNIFICAND_BITS.get(buf.dtype, 24) for buf in flat.buffers)
    return 2.0 ** (bits / 2) * scale / GAUSSIAN_BOUND


def check_perturbation_scale(flat: FlatParams, zo_eps: float, name: str = "--zo-eps") -> None:
    """ConfigError if restoring a perturbation of scale ``zo_eps`` would lose these weights (docstring)."""
    if not math.isfinite(rms(flat)):
        raise ConfigError("the starting weights are not all finite; this model cannot be fine-tuned")
    limit = max_perturbation(flat)
    if zo_eps >= limit:
        raise ConfigError(
            f"{name} {zo_eps:g} is too large for these weights (rms {rms(flat):.3g}): restoring a perturbation "
            f"that large keeps fewer than half of their significant bits; use a value below {limit:.3g}"
        )


class DivergenceGuard:
    """``check(step, coefs, zo_eps)`` after each update; raises TrainingDiverged (see module docstring)."""

    def __init__(self, flat: FlatParams, max_growth: float = DEFAULT_MAX_GROWTH):
        self.flat = flat
        self.max_growth = max_growth
        self.start_rms = rms(flat)

    def check(self, step: int, coefs: list[float], zo_eps: float) -> None:
        """``step`` is 1-based: the step just taken, which nothing has recorded yet."""
        if not all(math.isfinite(c) for c in coefs):
            self._stop(step, "its update coefficients overflowed (lr × released value is not a finite float32)")
        now = rms(self.flat)
        if not math.isfinite(now):
            self._stop(step, "the weights are no longer finite")
        band = self.max_growth * max(self.start_rms, zo_eps)
        if self.max_growth > 0 and now > band:
            self._stop(
                step,
                f"the weights' rms grew to {now:.3g}, above {self.max_growth:g}× its start "
                f"(max(rms θ₀ {self.start_rms:.3g}, λ {zo_eps:g}); --max-weight-growth)",
            )

    @staticmethod
    def _stop(step: int, why: str) -> None:
        raise TrainingDiverged(
            f"training diverged at step {step}: {why}; nothing of it was written (the ledger and checkpoints end "
            "before it). Lower --lr (or --clip) and start a new run"
        )
