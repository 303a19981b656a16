"""The first-order baselines in the trainer: a ``Session`` whose engine is a ``FirstOrderTrainer``,
and the DP-AdamW / AdamW loop (the ZO loop's bookkeeping around ``FirstOrderTrainer.step``)."""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from ... import privacy
from ...core.errors import UserError
from ...zo.rules import Released
from ...zo.stagewise import build_stagewise
from ..config import TrainConfig
from ..run_dir import RunDir
from ..session import Session, fingerprint
from .trainer import FirstOrderTrainer

# ----------------------------------------------------------------------------- trainer integration


class FirstOrderSession(Session):
    """``Session`` with a ``FirstOrderTrainer`` in place of the ZO engine: same task, model, head,
    Poisson sampler, σ calibration, accountant, output directory, evaluation and model saving."""

    def _metrics_row(self, row: dict) -> dict:
        row["backward_passes"] = row.pop("passes", self.engine.counter.passes)
        row.pop("relative_clip_error", None)  # needs the unclipped gradient sum, which Opacus does not keep
        for key in ("direction_values", "direction_values_per_weight_step"):  # no random directions here
            row.pop(key, None)
        return row

    def _build_engine(self) -> FirstOrderTrainer:
        """A ``FirstOrderTrainer`` on the session's model and head, made private with the session's plan
        (σ, q·ñ; on a GPU the noise comes from a secret generator of that device)."""
        cfg = self.cfg
        trainer = FirstOrderTrainer(
            self.model,
            self.head,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            mode=cfg.opacus_mode,
            physical_batch_size=cfg.physical_batch_size,
        )
        self.stages = build_stagewise(cfg.stage_options(), self.model, self.flat, None)  # constant lr, no stages
        if cfg.private:
            # d-dimensional noise drawn by Opacus (secure_mode) on the parameters' device, seeded from the run's key
            generator = privacy.secret_device_generator(trainer.params[0].device, secret=self.plan.generator)
            trainer.make_private(
                noise_multiplier=self.sigma,
                clip=cfg.clip,
                expected_batch_size=self.plan.normalizer,
                generator=generator,
            )
        return trainer

    def _ledger_header(self) -> dict:
        plan = self.plan
        return {
            "type": "header",
            "step": 0,
            "method": self.cfg.method,
            "backend": self.engine.backend,
            "master_seed": self.cfg.seed,
            **plan.public_facts(),
            "noise": self.engine.noise_description() if self.cfg.private else None,
            "num_labels": self.task.num_labels,
            "head": self.head_name,
            "max_length": self.max_length,
            "trainable": self.trainable,
            "trainable_numel": self.flat.numel,
            "initial_sha256": fingerprint(self.flat),
            "clip_mode": None,
            "first_order": self.engine.describe(),
        }

    def save_checkpoint(self, run: RunDir, step: int) -> None:
        raise UserError(f"--method {self.cfg.method} keeps no checkpoints")

    def _mechanism_facts(self) -> dict:
        facts = {"clip": self.cfg.clip, "clip_mode": "per-example gradient, L2", "num_directions": None}
        facts["gradient_dimension"] = sum(p.numel() for p in self.engine.params)
        if self.cfg.private:
            facts["noise"] = self.engine.noise_description()
        return facts

    def finalize(self, run: RunDir, elapsed: float) -> dict:
        self.model.eval()
        summary = super().finalize(run, elapsed)
        summary["backward_passes"] = summary.pop("passes", self.engine.counter.passes)
        summary.pop("direction_values_per_weight_step", None)
        summary["first_order"] = self.engine.describe()
        run.write_summary(summary)
        return summary


def train(cfg: TrainConfig, run: RunDir, s: FirstOrderSession, signals=None) -> dict:
    """The DP-AdamW / AdamW loop: sample, step, account, log (the ZO loop's bookkeeping). It keeps no
    checkpoints, so ``signals`` (the ZO loop's deferred stop) is not used: a signal ends it at once."""
    bar = tqdm(range(cfg.steps), total=cfg.steps, desc=cfg.method, unit="step")
    t0 = time.time()
    nan = float("nan")
    try:
        for step in bar:
            idx = s.sampler.sample()  # Poisson, from the secret generator
            stats = s.engine.step(s.batch(idx))
            s.accountant.step()
            eps = s.plan.epsilon()
            run.log_ledger({"type": "step", "step": step + 1, "lr": cfg.lr, "epsilon": eps})
            diagnostics = Released(torch.zeros(0), fraction_clipped=stats.fraction_clipped, relative_clip_error=nan)
            s.loss_meter.update(stats.loss, diagnostics)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                s.log_progress(run, bar, done, eps, time.time() - t0)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                run.log_metrics({"step": done, "split": "dev", **s.evaluate("dev")})
    finally:
        bar.close()
    elapsed = time.time() - t0
    s.engine.close()
    print(f"{cfg.method}: {s.engine.mode_reason}", file=sys.stderr)
    return s.finalize(run, elapsed)
