"""One DP-ZO training step (DESIGN section 5), shared by the trainer and the utility benchmark.

    (lr, λ)  = schedule(t)                     constant, or DP-ZOSO's stages (public)
    batch    = Poisson sample                  the SECRET generator
    seeds    = K public direction seeds of t
    D        = per-example directional derivatives through the fused passes
    g        = rule(D)                         clip, secret noise, / (q·n) for private methods
    θ        ← θ − lr Σ_k g_k z_k              fused with restoring the last perturbation

Where a batch comes from and what wraps the forwards (the frozen-prefix cache in the trainer,
replayed features in the benchmark) are the caller's; everything else is the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from . import stream
from .methods import MeZORule, PrivateRule, Released
from .stagewise import Stagewise
from .zo import ZOEngine

Batch = dict[str, torch.Tensor]


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
    loss: float | None  # mean per-example loss over the step's forwards (not private)

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
    """Callable ``step(t) -> StepRecord``; holds the engine, the release rule and the sampler."""

    engine: ZOEngine
    rule: MeZORule | PrivateRule
    sampler: object  # privacy.PoissonSampler (secret generator)
    stages: Stagewise
    per_example_loss: Callable[[Batch], torch.Tensor]
    collate: Callable[[list[int]], Batch]  # indices of a non-empty Poisson batch -> batch on the device
    forwards: Callable[[list[int]], AbstractContextManager]  # what wraps the step's forwards
    master_seed: int
    num_directions: int
    rounding: str

    def __call__(self, step: int) -> StepRecord:
        lr, zo_eps = self.stages.at(step)
        stage_row = self.stages.enter_stage(step) if self.stages.boundary(step) else None  # data-free, no ε
        idx = self.sampler.sample().tolist()
        batch = self.collate(idx) if idx else None
        loss_fn = (lambda: self.per_example_loss(batch)) if batch is not None else None  # None: empty batch
        seeds = stream.step_seeds(self.master_seed, step, self.num_directions)
        rounding_seed = stream.rounding_seed(self.master_seed, step)
        with torch.no_grad(), self.forwards(idx):
            D = self.engine.estimate(loss_fn, seeds, zo_eps)
            released = self.rule(D)
            coefs = (-lr * released.grad).to(torch.float32).tolist()
            self.engine.finish(seeds, zo_eps, coefs, self.rounding, rounding_seed)
            self.stages.after_update(step, lr)  # proximal pull towards the stage's start (--prox)
        return StepRecord(step, seeds, rounding_seed, lr, zo_eps, released, coefs, stage_row, self.engine.last_loss)
