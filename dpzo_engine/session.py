"""Everything a run needs before its first step, and what it does after the last.

``build_model`` is shared with ``replay``: the same public seed, model, trainable
subset and dtype give the same starting buffers, which the ledger header fingerprints.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from . import privacy
from .config import ConfigError, TrainConfig
from .data import get_task
from .flat import FlatParams
from .heads import build_head, count_at_length, evaluate, resolve_head
from .methods import MeZORule, PrivateRule, Released
from .models import load_model_and_tokenizer, model_kind, select_trainable
from .prefix_cache import cached_prefix, frozen_prefix_length
from .run_dir import RunDir
from .stagewise import build_stagewise
from .step import ZOStep
from .zo import PassCounter, ZOEngine


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but CUDA is not available here")
    return torch.device(name)


def fingerprint(flat: FlatParams) -> str:
    """sha256 of the trainable buffers: ties a ledger to its starting point."""
    h = hashlib.sha256()
    for buf in flat.buffers:
        h.update(buf.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_model(cfg: TrainConfig, num_labels: int, head: str = "sequence-classification"):
    """Model, tokenizer, trainable names and flat buffer, deterministic in ``cfg.seed``.
    ``head`` is the resolved loss head: it picks the model class (an LM head for prompt heads)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # public: a freshly initialised head is part of the base model
    dtype = getattr(torch, cfg.dtype)
    model, tokenizer = load_model_and_tokenizer(cfg.model, num_labels, dtype=dtype, device=device, head=head)
    model.eval()  # no dropout: L+ and L- must see the same function
    trainable = select_trainable(model, cfg.trainable)
    return model, tokenizer, trainable, FlatParams(model)


class NoAccountant:
    """Stand-in for non-private methods: counts steps, spends nothing."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def epsilon(self) -> float | None:
        return None

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


@dataclass
class LossMeter:
    """Running means between log steps (local diagnostics: not differentially private)."""

    losses: list[float] = field(default_factory=list)
    clipped: list[float] = field(default_factory=list)
    clip_errors: list[float] = field(default_factory=list)
    nonfinite: int = 0
    empty_batches: int = 0

    def update(self, loss: float | None, released: Released) -> None:
        if loss is None:
            self.empty_batches += 1
        else:
            self.losses.append(loss)
            self.clipped.append(released.fraction_clipped)
            self.clip_errors.append(released.relative_clip_error)
        self.nonfinite += released.nonfinite_rows

    def flush(self, step: int, eps: float | None, counter: PassCounter, elapsed: float) -> dict:
        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else float("nan")

        row = {
            "step": step,
            "loss": mean(self.losses),
            "fraction_clipped": mean(self.clipped),
            "relative_clip_error": mean(self.clip_errors),
            "nonfinite_rows": self.nonfinite,
            "empty_batches": self.empty_batches,
            "epsilon": eps,
            "passes": counter.passes,
            "forwards": counter.forwards,
            "elapsed_s": round(elapsed, 3),
        }
        self.__init__()
        return row


class Session:
    """A run's state: data, model, engine, sampler, privacy, and its start/finish."""

    def __init__(self, cfg: TrainConfig, run: RunDir, resuming: bool):
        self.cfg = cfg
        data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        self.task = get_task(
            cfg.task, data_dir=cfg.data_dir, seed=data_seed, k_shot=cfg.k_shot, num_train=cfg.num_train,
            num_dev=cfg.num_dev,
        )  # fmt: skip
        self.head_name = resolve_head(cfg.head, self.task, model_kind(cfg.model))  # auto: task + model decide
        n = len(self.task.train)
        if cfg.sample_rate is None and cfg.batch_size > n:
            raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {n} training examples")
        self.sample_rate = cfg.sample_rate if cfg.sample_rate is not None else cfg.batch_size / n
        self.max_length = cfg.max_length or self.task.max_length
        self.model, self.tokenizer, self.trainable, self.flat = build_model(cfg, self.task.num_labels, self.head_name)
        self.device = self.flat.device
        extra = {"max_new_tokens": cfg.max_new_tokens} if self.head_name == "causal-generation" else {}
        self.head = build_head(self.head_name, self.task, **extra)
        self._note_truncation()
        self.cached_blocks = frozen_prefix_length(self.model)  # run once per step, not 2K times
        self.engine = self._build_engine()
        self.stages = build_stagewise(cfg, self.model, self.flat, self.engine)  # DP-ZOSO schedule, DP-ZOPO mask
        self.generator = privacy.secret_generator(cfg.noise_seed)
        self.sampler = privacy.PoissonSampler(n, self.sample_rate, self.generator)
        self.loss_meter = LossMeter()
        self.start_step = 0
        self._setup_privacy(n)
        if resuming:
            self._resume(run)
        else:
            run.start(cfg)
            self.untrained = self.evaluate("test")
            run.log_ledger(self._ledger_header())
            run.log_metrics({"step": 0, "split": "test", **self.untrained})

    def _note_truncation(self) -> None:
        """Say on stderr when --max-length cuts training examples (SQuAD contexts at 48 tokens would be
        silently useless). Local only: the count is about private data and goes to no output file."""
        full = count_at_length(self.head, self.task.train, self.tokenizer, self.max_length)
        if full:
            print(
                f"note: {full} of {len(self.task.train)} training examples fill --max-length {self.max_length} "
                "tokens and are truncated (or exactly that long); raise --max-length to keep them whole",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ privacy
    def _setup_privacy(self, n: int) -> None:
        cfg = self.cfg
        self.count_epsilon = 0.0
        self.n_hat = float(n)
        if not cfg.private:
            self.sigma = 0.0
            self.rule = self._build_rule()
            self.accountant = NoAccountant()
            return
        if cfg.count_share > 0:  # n treated as private: release a Laplace-noised count
            self.count_epsilon = cfg.count_share * cfg.epsilon
            self.n_hat = privacy.laplace_count(n, self.count_epsilon, self.generator)
        self.sigma = privacy.calibrate_noise(
            cfg.epsilon, cfg.delta, self.sample_rate, cfg.steps, count_share=cfg.count_share
        )
        self.rule = self._build_rule()
        # Exact ε at every log step and at T; in between, the bound at the next log step (valid, and
        # one PRV query per log step instead of per step).
        self.accountant = privacy.PrivacyAccountant(
            self.sigma,
            self.sample_rate,
            cfg.delta,
            max_steps=cfg.steps,
            laplace_epsilon=self.count_epsilon,
            update_every=cfg.log_every,
        )

    def _build_engine(self):
        """What performs the steps: the fused ZO engine here; ``first_order.FirstOrderSession`` overrides it."""
        cfg = self.cfg
        return ZOEngine(self.flat, cfg.direction_kind, cfg.backend, cfg.difference)

    def _build_rule(self):
        """D [B, K] -> released vector, built once σ and ñ are known (first-order sessions privatise their
        optimizer here instead)."""
        cfg = self.cfg
        if not cfg.private:
            return MeZORule()
        mechanism = privacy.GaussianMechanism(
            self.sigma, cfg.clip, cfg.num_directions, cfg.clip_mode, generator=self.generator
        )
        return PrivateRule(mechanism, self.sample_rate * self.n_hat, backend=self.engine.backend)

    def _ledger_header(self) -> dict:
        return {
            "type": "header",
            "step": 0,
            "method": self.cfg.method,
            "backend": self.engine.backend,
            "direction_kind": self.cfg.direction_kind,
            "difference": self.cfg.difference,
            "rounding": self.cfg.update_rounding(),
            "master_seed": self.cfg.seed,
            "noise_multiplier": self.sigma,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.sample_rate * self.n_hat,
            "released_count": self.n_hat if self.count_epsilon > 0 else None,
            "num_labels": self.task.num_labels,
            "head": self.head_name,
            "max_length": self.max_length,
            "trainable": self.trainable,
            "trainable_numel": self.flat.numel,
            "cached_blocks": self.cached_blocks,
            "initial_sha256": fingerprint(self.flat),
            "clip_mode": getattr(getattr(self.rule, "mechanism", None), "clip_mode", None),  # what sets the noise
            **self.stages.header(),
        }

    # ------------------------------------------------------------------ steps
    def batch(self, idx: torch.Tensor | list[int]) -> dict | None:
        """The training examples ``idx`` collated on the device; None for an empty Poisson batch."""
        indices = idx.tolist() if torch.is_tensor(idx) else list(idx)
        if not indices:
            return None
        examples = [self.task.train[i] for i in indices]
        batch = self.head.collate(examples, self.tokenizer, self.max_length)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def build_step(self) -> ZOStep:
        """The ZO step of DESIGN section 5 on this session's parts (frozen bottom blocks run once)."""
        cfg = self.cfg
        return ZOStep(
            engine=self.engine,
            rule=self.rule,
            sampler=self.sampler,
            stages=self.stages,
            per_example_loss=lambda batch: self.head.per_example_loss(self.model, batch),
            collate=self.batch,
            forwards=lambda idx: cached_prefix(self.model, self.cached_blocks),
            master_seed=cfg.seed,
            num_directions=cfg.num_directions,
            rounding=cfg.update_rounding(),
        )

    def evaluate(self, split: str) -> dict:
        examples = getattr(self.task, split)
        if self.cfg.max_eval_examples is not None:
            examples = examples[: self.cfg.max_eval_examples]
        with torch.no_grad():
            return evaluate(self.model, self.head, examples, self.tokenizer, self.cfg.eval_batch_size, self.max_length)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, run: RunDir, step: int) -> None:
        state = {
            "step": step,
            "buffers": [b.detach().cpu().clone() for b in self.flat.buffers],
            "accountant": self.accountant.state_dict(),
            "counter": (self.engine.counter.passes, self.engine.counter.forwards),
            "untrained": self.untrained,
            "n_hat": self.n_hat,
            "stagewise": self.stages.state_dict(),  # the stage's mask and proximal anchor
        }
        run.save_checkpoint(step, state, {"generator": self.generator.get_state()})

    def _resume(self, run: RunDir) -> None:
        state, secret = run.load_checkpoint()
        self.flat.load_buffers([b.to(self.device) for b in state["buffers"]])
        self.accountant.load_state_dict(state["accountant"])
        self.engine.counter = PassCounter(*state["counter"])
        self.generator.set_state(secret["generator"])
        self.untrained = state["untrained"]
        self.n_hat = state["n_hat"]
        if "stagewise" in state:
            self.stages.load_state_dict(state["stagewise"])
        self.start_step = state["step"]
        run.truncate_logs(self.start_step)
        print(f"resuming {run.path} at step {self.start_step}", file=sys.stderr)

    # ------------------------------------------------------------------ finish
    def finalize(self, run: RunDir, elapsed: float) -> dict:
        final = self.evaluate("test")
        run.log_metrics({"step": self.cfg.steps, "split": "test", **final})
        save_model(self.model, self.tokenizer, run.model_dir)
        summary = {
            "method": self.cfg.method,
            "steps": self.cfg.steps,
            "head": self.head_name,
            "max_length": self.max_length,
            "metric": self.head.primary_metric,
            "untrained_test": self.untrained,
            "final_test": final,
            "epsilon_target": self.cfg.epsilon if self.cfg.private else None,
            "epsilon_spent": self.accountant.epsilon(),
            "delta": self.cfg.delta if self.cfg.private else None,
            "noise_multiplier": self.sigma,
            "sample_rate": self.sample_rate,
            "passes": self.engine.counter.passes,
            "forwards": self.engine.counter.forwards,
            "train_seconds": round(elapsed, 2),
            "output_dir": str(run.path),
            **self.stages.summary(),
        }
        run.write_summary(summary)
        return summary

    def log_progress(self, run: RunDir, bar, done: int, eps: float | None, elapsed: float) -> dict:
        """Flush the running means into metrics.jsonl and the progress bar (loss, ε, fraction clipped)."""
        row = self._metrics_row(self.loss_meter.flush(done, eps, self.engine.counter, elapsed))
        run.log_metrics(row)
        bar.set_postfix(
            loss=f"{row['loss']:.4f}",
            eps=f"{eps:.3f}" if eps is not None else "-",
            clipped=f"{row['fraction_clipped']:.2f}",
        )
        return row

    def _metrics_row(self, row: dict) -> dict:
        return row

    def print_summary(self, summary: dict) -> None:
        metric = summary.get("metric", "accuracy")
        u, f = summary["untrained_test"][metric], summary["final_test"][metric]
        eps = summary["epsilon_spent"]
        privacy_line = (
            f"epsilon spent {eps:.3f} (target {summary['epsilon_target']}, delta {summary['delta']:g})"
            if eps is not None
            else "non-private run (no epsilon)"
        )
        print(
            f"\ntest {metric.replace('_', ' ')}: untrained {u:.4f} -> fine-tuned {f:.4f}\n{privacy_line}\n"
            f"outputs: {summary['output_dir']} (model/, metrics.jsonl, ledger.jsonl, summary.json)"
        )


def save_model(model: nn.Module, tokenizer, path) -> None:
    """save_pretrained with independent copies: parameters are views of one flat buffer,
    which safetensors would otherwise see as shared storage."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(path, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
