"""Stagewise schedules of DP-ZOSO (Liu et al., NDSS 2025): stages of doubling length.

``T`` steps split into ``S`` stages of lengths ``I, 2I, 4I, ..., 2^(S-1) I`` with
``I = T // (2^S - 1)``; the remainder of the division goes to the last stage, so the stages
cover exactly ``T`` steps. In stage ``s``:

    lr_s = lr · decay^s                                  (decay 0.5: the rate halves each stage)
    λ_s  = λ_start · (λ_end / λ_start)^(s / (S - 1))     (geometric, λ_0 = λ_start, λ_{S-1} = λ_end)

The public code moves λ by a factor κ = (λ_end − λ_start)^(1/S) per stage, which is 1 (no
change) when λ_end = λ_start and undefined (a negative base) when λ_end < λ_start; the
geometric interpolation above is what it was meant to do. A schedule depends on public
values only (T, S, the rates), so it costs no privacy and the ledger replays it.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from ..core.errors import ConfigError

MAX_STAGES = 40  # 2^40 steps: far beyond any run; keeps 2^S exact in a float


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--{name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class StageSchedule:
    """Per-step learning rate and perturbation scale λ of a run with ``stages`` doubling stages."""

    total_steps: int
    stages: int
    lr: float
    zo_eps_start: float
    zo_eps_end: float | None = None  # None: λ stays at zo_eps_start
    lr_decay: float = 0.5
    boundaries: tuple[int, ...] = field(init=False, repr=False)  # first step (0-based) of each stage

    def __post_init__(self) -> None:
        T, S = self.total_steps, self.stages
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ConfigError(f"--steps must be a positive integer, got {T!r}")
        if isinstance(S, bool) or not isinstance(S, int) or not 1 <= S <= MAX_STAGES:
            raise ConfigError(f"--stages must be an integer in [1, {MAX_STAGES}], got {S!r}")
        if T < 2**S - 1:
            raise ConfigError(
                f"--stages {S} needs at least {2**S - 1} steps (stage lengths I, 2I, ..., "
                f"{2 ** (S - 1)}I with I >= 1); got --steps {T}"
            )
        _positive("lr", self.lr)
        _positive("zo-scale-start", self.zo_eps_start)
        if self.zo_eps_end is not None:
            _positive("zo-scale-end", self.zo_eps_end)
        decay = self.lr_decay
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay <= 1:
            raise ConfigError(f"--lr-decay must be in (0, 1] (0.5 halves the rate each stage), got {decay!r}")
        base = T // (2**S - 1)
        object.__setattr__(self, "boundaries", tuple(base * (2**s - 1) for s in range(S)))

    # ------------------------------------------------------------------ stages
    @property
    def base_length(self) -> int:
        """I, the length of the first stage."""
        return self.total_steps // (2**self.stages - 1)

    def stage_length(self, s: int) -> int:
        end = self.boundaries[s + 1] if s + 1 < self.stages else self.total_steps
        return end - self.boundaries[s]

    def stage_of(self, step: int) -> int:
        """Stage of 0-based ``step`` (steps past the end belong to the last stage)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return bisect.bisect_right(self.boundaries, step) - 1

    def is_stage_start(self, step: int) -> bool:
        return step in self.boundaries

    # ------------------------------------------------------------------ values
    def stage_lr(self, s: int) -> float:
        return self.lr * self.lr_decay**s

    def stage_zo_eps(self, s: int) -> float:
        start, end = self.zo_eps_start, self.zo_eps_end
        if end is None or end == start or self.stages == 1:
            return start
        if s == self.stages - 1:
            return end  # exact, not start·(end/start)^1 with its rounding
        return start * (end / start) ** (s / (self.stages - 1))

    def at(self, step: int) -> tuple[float, float]:
        """(learning rate, λ) for 0-based ``step``: all the trainer asks of a schedule."""
        s = self.stage_of(step)
        return self.stage_lr(s), self.stage_zo_eps(s)

    def describe(self) -> list[dict]:
        """One row per stage (for the ledger header and the README's tables)."""
        return [
            {
                "stage": s,
                "start": self.boundaries[s],
                "length": self.stage_length(s),
                "lr": self.stage_lr(s),
                "zo_eps": self.stage_zo_eps(s),
            }
            for s in range(self.stages)
        ]
