"""One DP-ZO training step (docs/design.md section 5), shared by the API, the trainer, replay and the benchmarks.

    (lr, λ)  = schedule(t)                     constant, or DP-ZOSO's stages (public)
    seeds    = K public direction seeds of t
    D        = per-example directional derivatives through the fused passes
    S        = clipped column sums of D/K       over the batch
    g        = release(S)                      secret noise, / (q·n) for private methods
    θ        ← θ − lr Σ_k g_k z_k              fused with restoring the last perturbation

The batch is the caller's (a Poisson sample from the secret generator, see ``PrivateZO``): a step
only sees a loss function. ``replay_step`` applies a released step from its ledger row alone.
Spread over ranks (``zo.parallel``), D's columns are gathered from the direction ranks, S is summed
over the data ranks, and g comes from rank 0; on one rank those three calls return their input.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from ..core import stream
from ..core.errors import ConfigError
from .engine import ZOEngine
from .parallel import Comm
from .rules import MeZORule, PrivateRule, Released
from .stagewise import Stagewise

LossFn = Callable[[], torch.Tensor]  # per-example losses [B] at the current θ


@dataclass
class StepRecord:
    """What a step did: its public values (the ledger's) and its local diagnostics."""

    step: int  # 0-based
    seeds: list[int]
    rounding_seed: int
    lr: float
    zo_eps: float
    released: Released
    coefs: list[float]
    stage_row: dict | None  # the stage's public ledger row when the step opens a stage
    loss: float | None  # mean per-example loss over this rank's forwards of the step (not private)
    loss_count: int = 0  # finite per-example losses behind ``loss`` (to average over ranks)

    def ledger_row(self, epsilon: float | None) -> dict:
        return {
            "type": "step",
            "step": self.step + 1,
            "seeds": self.seeds,
            "rounding_seed": self.rounding_seed,
            "zo_eps": self.zo_eps,
            "lr": self.lr,
            "released": self.released.grad.tolist(),
            "coefs": self.coefs,
            "epsilon": epsilon,
        }


@dataclass
class ZOStep:
    """Callable ``step(t, loss_fn) -> StepRecord``: the engine's passes, the release rule, the schedule."""

    engine: ZOEngine
    rule: MeZORule | PrivateRule
    stages: Stagewise
    master_seed: int
    num_directions: int
    rounding: str
    comm: Comm = field(default_factory=Comm)

    def __call__(self, step: int, loss_fn: LossFn | None, forwards: AbstractContextManager | None = None) -> StepRecord:
        """``loss_fn`` None is an empty Poisson batch: the same passes run, no forward does, and
        the release is pure noise. ``forwards`` wraps the step's forwards (e.g. the prefix cache)."""
        lr, zo_eps = self.stages.at(step)
        stage_row = self.stages.enter_stage(step) if self.stages.boundary(step) else None  # data-free, no ε
        seeds = stream.step_seeds(self.master_seed, step, self.num_directions)
        rounding_seed = stream.rounding_seed(self.master_seed, step)
        comm = self.comm
        comm.step = step + 1
        with torch.no_grad(), forwards if forwards is not None else nullcontext():
            mine = comm.layout.directions(self.num_directions)
            D = comm.gather_directions(self.engine.estimate(loss_fn, seeds, zo_eps, mine))  # [B here, K]
            clipped = comm.sum_over_data(self.rule.clip(D))  # fp64 sums over the whole batch
            released = self.rule.release(clipped) if comm.is_root else None  # the secret noise: rank 0 only
            released = Released.of(comm.from_root(released and released.grad, like=clipped.sums), clipped)
            coefs = (-lr * released.grad).to(torch.float32).tolist()
            self.engine.finish(seeds, zo_eps, coefs, self.rounding, rounding_seed)
            self.stages.after_update(step, lr)  # proximal pull towards the stage's start (--prox)
        loss, count = self.engine.last_loss, self.engine.last_losses[1]
        return StepRecord(step, seeds, rounding_seed, lr, zo_eps, released, coefs, stage_row, loss, count)


def replay_step(engine: ZOEngine, stages: Stagewise, row: dict, rounding: str) -> dict | None:
    """Apply a released step from its public ledger row: the same passes, no data, no forward.

    Returns the stage event the step opens, recomputed (DP-ZOPO's data-free mask), for the caller
    to check against the ledger's; None when the step opens no stage."""
    step = row["step"] - 1
    event = stages.enter_stage(step) if stages.boundary(step) else None
    with torch.no_grad():
        engine.estimate(None, row["seeds"], row["zo_eps"])
        engine.finish(row["seeds"], row["zo_eps"], row["coefs"], rounding, row["rounding_seed"])
        stages.after_update(step, row["lr"])
    return event


def check_stage_event(ours: dict, logged: dict | None) -> None:
    """A stage event recomputed by ``replay_step`` must match the ledger's (schedule values, mask fingerprint)."""
    if logged is None:
        raise ConfigError(f"the ledger has no stage record for step {ours['step']}; it was not written by this run")
    for key in ("stage", "lr", "zo_eps"):
        if ours[key] != logged.get(key):
            raise ConfigError(f"stage {ours['stage']}: {key} {ours[key]} differs from the ledger's {logged.get(key)}")
    if "mask" in ours and ours["mask"]["sha256"] != (logged.get("mask") or {}).get("sha256"):
        raise ConfigError(
            f"stage {ours['stage']}: the recomputed data-free mask differs from the ledger's (sha256 mismatch); "
            "replay on the run's own backend"
        )
