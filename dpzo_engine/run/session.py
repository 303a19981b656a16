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

from .. import privacy
from ..core import stream
from ..core.errors import ConfigError
from ..core.flat import FlatParams
from ..data import get_task
from ..heads import build_head, count_at_length, evaluate, resolve_head
from ..models.loading import load_model_and_tokenizer, model_kind, select_trainable
from ..models.prefix_cache import cached_prefix, frozen_prefix_length
from ..zo.engine import PassCounter
from ..zo.private_zo import PrivateZO
from ..zo.rules import Released
from .config import TrainConfig
from .run_dir import RunDir


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

    def flush(self, step: int, eps: float | None, counter: PassCounter, elapsed: float, numel: int) -> dict:
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
            "direction_values": counter.direction_values,
            # RNG work: direction values generated per trainable weight per step (4K - 1 central, 3K - 1 forward)
            "direction_values_per_weight_step": counter.direction_values / (numel * step) if step and numel else None,
            "elapsed_s": round(elapsed, 3),
        }
        self.__init__()
        return row


class Session:
    """A run's state: data, model, head, the privacy plan and the trainer (``PrivateZO`` for ZO methods)."""

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
        self.plan = privacy.PrivacyPlan.create(
            n,
            steps=cfg.steps,
            sample_rate=self.sample_rate,
            epsilon=cfg.epsilon if cfg.private else None,
            delta=cfg.delta,
            count_share=cfg.count_share,
            noise_seed=cfg.noise_seed,
            update_every=cfg.log_every,  # exact ε at log steps; in between the next log step's bound
        )
        self.sigma, self.accountant, self.sampler = self.plan.noise_multiplier, self.plan.accountant, self.plan.sampler
        self.engine = self._build_engine()
        self.loss_meter = LossMeter()
        self.start_step = 0
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

    def _build_engine(self):
        """What performs the steps: ``PrivateZO`` here (the Python API); first_order overrides it."""
        self.zo = PrivateZO(self.model, self.plan, self.cfg.zo_options(), self.cfg.steps, flat=self.flat)
        self.stages = self.zo.stages  # DP-ZOSO schedule, DP-ZOPO mask
        return self.zo.engine

    def _ledger_header(self) -> dict:
        return {
            "type": "header",
            "step": 0,
            **self.zo.header(),
            "num_labels": self.task.num_labels,
            "head": self.head_name,
            "max_length": self.max_length,
            "trainable": self.trainable,
            "cached_blocks": self.cached_blocks,
            "initial_sha256": fingerprint(self.flat),
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

    def loss_fn(self, idx: list[int]):
        """The per-example loss of the Poisson batch ``idx``, or None for an empty batch (pure noise)."""
        batch = self.batch(idx)
        return None if batch is None else (lambda: self.head.per_example_loss(self.model, batch))

    def forwards(self):
        """What wraps a step's forwards: the frozen bottom blocks run once, not 2K times (exact)."""
        return cached_prefix(self.model, self.cached_blocks)

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
            "zo": self.zo.state_dict(),
            "untrained": self.untrained,
        }
        run.save_checkpoint(step, state, self.zo.secret_state())

    def _resume(self, run: RunDir) -> None:
        header, _ = run.ledger()
        stream.check_version(header.get("stream_version"), f"--resume: {run.ledger_path}")
        state, secret = run.load_checkpoint()
        self.flat.load_buffers([b.to(self.device) for b in state["buffers"]])
        self.zo.load_state_dict(state["zo"])
        self.zo.load_secret_state(secret)
        self.untrained = state["untrained"]
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
            "direction_values_per_weight_step": self.engine.counter.direction_values
            / (self.flat.numel * self.cfg.steps),
            "train_seconds": round(elapsed, 2),
            "output_dir": str(run.path),
            **self.stages.summary(),
        }
        run.write_summary(summary)
        return summary

    def log_progress(self, run: RunDir, bar, done: int, eps: float | None, elapsed: float) -> dict:
        """Flush the running means into metrics.jsonl and the progress bar (loss, ε, fraction clipped)."""
        row = self._metrics_row(self.loss_meter.flush(done, eps, self.engine.counter, elapsed, self.flat.numel))
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
