"""Utility benchmark: DP-AggZO against DPZero, MeZO and the untrained model on real offline data.

The paper's central claim (Bao et al. 2025, Figure 5) in our setting: at the same ε, the same
number of steps and the same expected batch, aggregating K directions per example before
clipping beats DPZero's single direction, and the gain grows with K. For each task, ε ∈ {2, 6}
and δ = 1e-5, every method (DPZero = K 1, DP-AggZO K = 4, 16, 64, non-private MeZO with K = 1)
trains the same trainable subset for ``--steps`` steps with Poisson batches of expected size
``--batch-size``; the forward passes are counted.

Protocol. Hyperparameters: a small grid of learning rate × clipping threshold per method (C
scaled as β/√K, the paper's rule), each point trained once (seed 0) and scored on the dev split;
the best dev accuracy picks the point, which is then trained with ``--seeds`` seeds (0 included)
and scored on the test split: mean, standard deviation and range over seeds are reported. A
"seed" is the public direction seed; Poisson sampling and DP noise come from the secret
generator (OS entropy), as in the trainer, so they differ in every run. The model's starting
weights and the data splits are fixed. The hyperparameter search itself is not privately
accounted (as in the papers); the JSON says so.

Speed (exact, not an approximation): with ``--trainable head`` every transformer block is frozen,
so each example's output of the frozen blocks is computed once for the whole benchmark and
replayed in every forward (the trainer's prefix cache does this within a step; here it also
spans steps and runs). Embeddings are skipped then too: they feed only the replayed blocks.
The training loop is the trainer's (``dpzo_engine/train.py``): the same sampler, direction
seeds, ZO engine, clipping rule, Gaussian mechanism and PRV calibration.

DP-ZOSO and DP-ZOPO rows (K = 1, ``--stages`` doubling stages, lr halved at each boundary, λ
constant; DP-ZOPO trains a static data-free mask of ``--keep-fraction``) sit beside DPZero, with
the same grid and noise: the schedule and the mask are data-free, so σ and ε are DPZero's.

``python bench/utility.py`` (CPU-sized defaults) writes ``bench/results/utility_<device>.json``
and ``utility_<device>.png`` (accuracy against K) and prints a table. ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import common
import torch
from torch import nn

from dpzo_engine import privacy
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.data import Example, TaskData, get_task
from dpzo_engine.heads import ClassificationHead, build_head, move_batch, resolve_head
from dpzo_engine.models.adapters import Adapter, AdapterOptions, build_adapter
from dpzo_engine.models.loading import _layer_stack, load_model_and_tokenizer, model_kind, select_trainable
from dpzo_engine.models.prefix_cache import frozen_prefix_length
from dpzo_engine.run.session import save_model, weights_bytes
from dpzo_engine.zo.private_zo import PrivateZO, ZOOptions
from dpzo_engine.zo.stagewise import StageOptions

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DELTA = 1e-5
ZO_EPS = 1e-3
STAGEWISE = ("dp-zoso", "dp-zopo")  # rows beside DPZero, kept out of the accuracy-against-K line and claim


@dataclass(frozen=True)
class Method:
    """One row of the comparison: K directions, private or not."""

    name: str
    K: int
    private: bool = True
    stages: int = 1  # DP-ZOSO / DP-ZOPO: doubling stages, lr halved at each boundary
    keep_fraction: float | None = None  # DP-ZOPO: static data-free mask
    setting: str = "head"  # "head": the --trainable subset; "lora": a LoRA adapter plus that subset

    @property
    def first_order(self) -> bool:
        return self.name == "dp-adamw"

    @property
    def label(self) -> str:
        if self.setting == "lora" or self.first_order:
            base = "DP-AdamW (Opacus)" if self.first_order else f"DP-AggZO (K={self.K})"
            return base + (" + LoRA" if self.setting == "lora" else ", head only")
        if not self.private:
            return f"MeZO (non-private, K={self.K})"
        if self.name == "dp-zoso":
            return f"DP-ZOSO (K={self.K}, S={self.stages})"
        if self.name == "dp-zopo":
            return f"DP-ZOPO (K={self.K}, S={self.stages}, {self.keep_fraction:.0%})"
        return "DPZero (K=1)" if self.K == 1 else f"DP-AggZO (K={self.K})"


@dataclass(frozen=True)
class Grid:
    """Learning rates and clipping scales; C = β/√K (the paper's rule: per-example K-vectors scaled by
    1/K have norms ≈ |∇L·z|/√K, so a fixed β clips a fixed share of examples at every K)."""

    lrs: tuple[float, ...]
    betas: tuple[float, ...]

    def points(self, method: Method) -> list[tuple[float, float | None]]:
        if not method.private:
            return [(lr, None) for lr in self.lr_for(method)]
        return [(lr, beta / math.sqrt(method.K)) for lr in self.lr_for(method) for beta in self.betas]

    def lr_for(self, method: Method) -> list[float]:
        """Learning rates scaled by √K: the update Σ_k g_k z_k of K averaged estimates is √K shorter."""
        return [lr * math.sqrt(method.K) for lr in self.lrs]


@dataclass
class Setting:
    """A task on a model, ready to train: frozen features, head, flat buffer and its start."""

    task: TaskData
    model: nn.Module
    tokenizer: object
    head: ClassificationHead
    flat: FlatParams
    start: list[torch.Tensor]
    features: FrozenFeatures
    max_length: int
    info: dict = field(default_factory=dict)
    adapter: Adapter | None = None  # the LoRA setting: the adapter's flat buffer, saved as an adapter


# ----------------------------------------------------------------------------- frozen features


def _input_embedding_module(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    return getattr(base, "embeddings", None) or model.get_input_embeddings()


class FrozenFeatures:
    """Each example's output of the frozen transformer blocks, computed once and replayed.

    Exact: a frozen block's output depends only on its input, and below the first trainable
    block that input depends only on the example (padding is masked, rows do not interact).
    ``replay(split, rows)`` makes the next forwards of the batch ``rows`` of ``split`` return
    the stored outputs from the last frozen block and skip the blocks and embeddings below.
    """

    def __init__(
        self,
        model: nn.Module,
        head: ClassificationHead,
        tokenizer,
        splits: dict[str, Sequence[Example]],
        max_length: int,
        batch_size: int = 64,
        first_position: bool = False,
    ):
        self.model = model
        self.length = frozen_prefix_length(model)
        if self.length == 0:
            raise ValueError("no frozen transformer block below the trainable ones: nothing to precompute")
        stack, n_layers = _layer_stack(model)
        self.blocks = list(model.get_submodule(stack))[: self.length]
        self.top = None  # the one trained block, computed at the first position only (see first_position_attention)
        if first_position:
            if self.length != n_layers - 1:
                raise ValueError("first_position needs exactly one block above the frozen ones (the last)")
            self.top = model.get_submodule(stack)[self.length]
        self.embedding = _input_embedding_module(model)
        self.width = self.embedding.weight.shape[1] if hasattr(self.embedding, "weight") else None
        self.store: dict[str, torch.Tensor] = {}
        device = next(model.parameters()).device
        captured: list[torch.Tensor] = []
        hook = self.blocks[-1].register_forward_hook(lambda m, a, out: captured.append(_hidden(out)))
        try:
            with torch.no_grad():
                for split, examples in splits.items():
                    parts = []
                    for start in range(0, len(examples), batch_size):
                        chunk = examples[start : start + batch_size]
                        captured.clear()
                        head.class_scores(model, move_batch(head.collate(chunk, tokenizer, max_length), device))
                        out = captured[0]
                        padded = out.new_zeros(out.shape[0], max_length, out.shape[-1])
                        padded[:, : out.shape[1]] = out  # rows padded to max_length; pad positions are masked
                        parts.append(padded)
                    self.store[split] = torch.cat(parts)
        finally:
            hook.remove()
        self._rows: torch.Tensor | None = None
        self._split = ""

    @contextlib.contextmanager
    def replay(self, split: str, rows: Sequence[int]) -> Iterator[None]:
        self._split = split
        self._rows = torch.as_tensor(list(rows), dtype=torch.long, device=self.store[split].device)
        patched = [*self.blocks, self.embedding]
        for i, block in enumerate(self.blocks):
            block.forward = self._block(last=i == len(self.blocks) - 1)
        self.embedding.forward = self._skip_embedding
        if self.top is not None:
            self.top.attention.forward = first_position_attention(self.top.attention)
            patched.append(self.top.attention)
        try:
            yield
        finally:
            for module in patched:
                del module.forward
            self._rows = None

    def _block(self, last: bool):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if not last:
                return hidden
            assert self._rows is not None
            return self.store[self._split].index_select(0, self._rows)[:, : hidden.shape[1]].to(hidden.dtype)

        return forward

    def _skip_embedding(self, *args, **kwargs) -> torch.Tensor:
        ids = kwargs.get("input_ids", args[0] if args else None)
        dtype = next(self.model.parameters()).dtype
        return torch.zeros((*ids.shape, self.width or self.model.config.hidden_size), dtype=dtype, device=ids.device)


def first_position_attention(attention: nn.Module):
    """A BERT-style attention block (``BertAttention``, ``RobertaAttention``) computed for the first
    position only: its query attends to every position's key and value; the residual, the output
    projection, and everything after it in the block, run on that one row.

    Exact for a classifier that reads only the last block's first position (BERT's pooler, RoBERTa's
    classification head): no other output position of the last block reaches the loss. With LoRA on
    the last block only, this makes a forward cost its key and value projections of every token plus
    one token's worth of the rest, instead of the whole block (checked against the full model)."""
    from transformers.models.bert.modeling_bert import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    sa = attention.self

    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        b, t, _ = hidden_states.shape
        d = sa.attention_head_size
        q = sa.query(hidden_states[:, :1]).view(b, 1, -1, d).transpose(1, 2)
        k = sa.key(hidden_states).view(b, t, -1, d).transpose(1, 2)
        v = sa.value(hidden_states).view(b, t, -1, d).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
            attention_mask = attention_mask[:, :, :1]  # the first query row of the mask
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
        dropout = sa.dropout.p if sa.training else 0.0
        out, weights = interface(sa, q, k, v, attention_mask, dropout=dropout, scaling=sa.scaling, **kwargs)
        return attention.output(out.reshape(b, 1, -1).contiguous(), hidden_states[:, :1]), weights

    return forward


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------- one run


def scores(s: Setting, split: str, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and mean loss on a split, through the replayed features."""
    examples = s.task.split(split)
    correct, loss = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            rows = range(start, min(start + batch_size, len(examples)))
            batch = move_batch(s.head.collate([examples[i] for i in rows], s.tokenizer, s.max_length), s.flat.device)
            with s.features.replay(split, rows):
                losses, preds = s.head.loss_and_predict(s.model, batch)
            correct += float((preds == batch["labels"]).sum())
            loss += float(losses.double().sum())
    return {"accuracy": correct / len(examples), "loss": loss / len(examples)}


_SIGMAS: dict[tuple, float] = {}


def noise_multiplier(epsilon: float, q: float, steps: int) -> float:
    key = (epsilon, q, steps)
    if key not in _SIGMAS:
        _SIGMAS[key] = privacy.calibrate_noise(epsilon, DELTA, q, steps)
    return _SIGMAS[key]


def train_once(
    s: Setting,
    method: Method,
    epsilon: float | None,
    lr: float,
    clip: float | None,
    seed: int,
    steps: int,
    batch_size: int,
) -> dict:
    """The trainer's loop (train.py) on the replayed features; returns dev/test scores and costs."""
    s.flat.load_buffers(s.start)
    train = s.task.train
    q = batch_size / len(train)
    private = method.private
    sigma = noise_multiplier(epsilon, q, steps) if private else 0.0
    plan = privacy.PrivacyPlan.create(  # secret generator (OS entropy), Poisson sampler, accountant
        len(train),
        steps=steps,
        sample_rate=q,
        epsilon=epsilon if private else None,
        delta=DELTA,
        update_every=steps,
        noise_multiplier=sigma if private else None,
    )
    stages = StageOptions(  # DP-ZOSO / DP-ZOPO: lr halves at each boundary; the mask is data-free (no ε)
        steps, lr, ZO_EPS, seed=seed, stages=method.stages, mask=method.keep_fraction is not None,
        keep_fraction=method.keep_fraction or 0.01,
    )  # fmt: skip
    options = ZOOptions(
        method="dp-aggzo" if private else "mezo",
        num_directions=method.K,
        lr=lr,
        zo_eps=ZO_EPS,
        clip=clip if private else 1.0,
        seed=seed,
        rounding="stochastic" if s.flat.buffers[0].dtype == torch.bfloat16 else "nearest",  # the trainer's auto
        stages=stages,
    )
    zo = PrivateZO(s.model, plan, options, steps, flat=s.flat)  # the trainer's API, on the replayed features
    estimate, largest = zo.engine.estimate, [0]

    def recorded(*a, **k):  # ZO keeps no activations, gradients or moments: its extra is D [B, K]
        D = estimate(*a, **k)
        largest[0] = max(largest[0], D.nbytes)
        return D

    zo.engine.estimate = recorded

    def loss_fn(idx: list[int]):
        if not idx:
            return None
        batch = move_batch(s.head.collate([train[i] for i in idx], s.tokenizer, s.max_length), s.flat.device)
        return lambda: s.head.per_example_loss(s.model, batch)

    clipped: list[float] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = zo.sample()
        rec = zo.step(loss_fn(idx), forwards=s.features.replay("train", idx))
        if private:
            clipped.append(rec.released.fraction_clipped)
    seconds = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(b).all()) for b in s.flat.buffers)  # a diverged point scores NaN
    return {
        "dev": scores(s, "dev") if finite else {"accuracy": float("nan"), "loss": float("nan")},
        "test": scores(s, "test") if finite else {"accuracy": float("nan"), "loss": float("nan")},
        "forwards": zo.engine.counter.forwards,
        "passes": zo.engine.counter.passes,
        "train_seconds": round(seconds, 2),
        "noise_multiplier": sigma,
        "epsilon_spent": zo.epsilon(),
        "fraction_clipped": statistics.fmean(clipped) if clipped else None,
        "extra_training_bytes": {"zo_derivatives": largest[0], "total": largest[0]},
    }


@contextlib.contextmanager
def saved_for_backward(exclude: set[int]) -> Iterator[dict[int, int]]:
    """Bytes autograd keeps for the backward pass (the activations first-order training holds beyond
    an inference forward), one entry per storage, storages in ``exclude`` (the weights) left out."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def train_first_order(
    s: Setting, epsilon: float, lr: float, clip: float, seed: int, steps: int, batch_size: int
) -> dict:
    """DP-AdamW as the trainer runs it (``FirstOrderTrainer``: Opacus per-example clipping, our sampler,
    σ, secret noise and accountant) on the replayed features: only the trainable top runs backward."""
    from dpzo_engine.run.first_order import FirstOrderTrainer

    s.flat.load_buffers(s.start)
    torch.manual_seed(seed)  # dropout masks: first-order training runs in train mode, as the trainer does
    train = s.task.train
    q = batch_size / len(train)
    sigma = noise_multiplier(epsilon, q, steps)
    plan = privacy.PrivacyPlan.create(
        len(train), steps=steps, sample_rate=q, epsilon=epsilon, delta=DELTA, update_every=steps,
        noise_multiplier=sigma,
    )  # fmt: skip
    trainer = FirstOrderTrainer(s.model, s.head, lr=lr, mode="auto")
    trainer.make_private(
        noise_multiplier=sigma, clip=clip, expected_batch_size=plan.normalizer, generator=plan.generator
    )
    weights = {t.untyped_storage().data_ptr() for t in (*s.model.parameters(), *s.model.buffers())}
    clipped: list[float] = []
    memory: dict = {}
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            idx = plan.sampler.sample().tolist()
            batch = None  # an empty Poisson batch: a noise-only update
            if idx:
                batch = move_batch(s.head.collate([train[i] for i in idx], s.tokenizer, s.max_length), s.flat.device)
            with s.features.replay("train", idx), saved_for_backward(weights) as saved:
                stats = trainer.step(batch)
            plan.accountant.step()
            if idx:
                clipped.append(stats.fraction_clipped)
                if not memory or sum(saved.values()) > memory["saved_activations"]:
                    moments = sum(
                        t.nbytes
                        for st in trainer.optimizer.state.values()
                        for t in st.values()
                        if torch.is_tensor(t) and t.dim()
                    )
                    memory = {
                        "saved_activations": sum(saved.values()),
                        "gradients": s.flat.nbytes,
                        "optimizer_state": moments,
                    }
    finally:
        trainer.close()
        s.model.eval()
    seconds = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(b).all()) for b in s.flat.buffers)
    nan = {"accuracy": float("nan"), "loss": float("nan")}
    return {
        "dev": scores(s, "dev") if finite else nan,
        "test": scores(s, "test") if finite else nan,
        "forwards": trainer.counter.forwards,
        "passes": trainer.counter.passes,  # backward passes (two per step with ghost clipping)
        "train_seconds": round(seconds, 2),
        "noise_multiplier": sigma,
        "epsilon_spent": plan.epsilon(),
        "fraction_clipped": statistics.fmean(clipped) if clipped else None,
        "opacus_mode": trainer.mode,
        "extra_training_bytes": {**memory, "total": sum(memory.values())},
    }


# ----------------------------------------------------------------------------- the benchmark


def load_setting(
    task: TaskData, model_name: str, trainable: str, max_length: int, adapter: AdapterOptions | None = None
) -> Setting:
    """``adapter``: a LoRA (or prefix) adapter whose ``modules_to_save`` are the ``trainable`` subset."""
    t0 = time.perf_counter()
    head_name = resolve_head("auto", task, model_kind(model_name))
    model, tokenizer = load_model_and_tokenizer(
        model_name,
        task.num_labels,
        head=head_name,
        seed=0,
        device="cuda" if torch.cuda.is_available() else "cpu",
        dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
    )
    built = None
    if adapter is not None:
        torch.manual_seed(0)  # the adapter's initialisation, as the trainer's public seed
        built = build_adapter(model, dataclasses.replace(adapter, trainable=trainable), head_name)
        model, names, flat = built.model, built.trainable_names(), FlatParams(built.peft_model)
    else:
        names = select_trainable(model, trainable)
        flat = FlatParams(model)
    with tempfile.TemporaryDirectory() as tmp:  # what the trainer saves: the adapter, or the whole model
        if built is not None:
            built.save(tmp)
        else:
            save_model(model, None, tmp)
        saved_bytes = weights_bytes(tmp)
    head = build_head(head_name, task)
    assert isinstance(head, ClassificationHead)
    splits = {"train": task.train, "dev": task.dev, "test": task.test}
    first_position = (
        built is not None
        and head_name == "sequence-classification"
        and model_kind(model_name) in ("encoder", "masked-lm")
        and frozen_prefix_length(model) == _layer_stack(model)[1] - 1
    )  # a BERT-style classifier reads the first position of the last block only
    features = FrozenFeatures(model, head, tokenizer, splits, max_length, first_position=first_position)
    info = {
        "task": task.describe() | {"fingerprint": task.fingerprint()[:16]},
        "model": model_name,
        "head": head_name,
        "trainable": trainable,
        "trainable_tensors": len(names),
        "trainable_numel": flat.numel,
        "frozen_blocks_replayed": features.length,
        "top_block_first_position_only": first_position,
        "max_length": max_length,
        "saved_weights_bytes": saved_bytes,
        "setup_seconds": round(time.perf_counter() - t0, 1),
    }
    if built is not None:
        info["adapter"] = built.describe()
    return Setting(task, model, tokenizer, head, flat, flat.clone_buffers(), features, max_length, info, built)


def check_replay_is_exact(s: Setting, n: int = 32) -> float:
    """Largest |loss difference| between the full model and the replayed features on n train examples."""
    examples = s.task.train[:n]
    batch = move_batch(s.head.collate(examples, s.tokenizer, s.max_length), s.flat.device)
    with torch.no_grad():
        full = s.head.per_example_loss(s.model, batch)
        with s.features.replay("train", range(n)):
            replayed = s.head.per_example_loss(s.model, batch)
    return float((full - replayed).abs().max())


def summarize(values: list[float]) -> dict:
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "mean": statistics.fmean(ok),
        "std": statistics.stdev(ok) if len(ok) > 1 else 0.0,
        "min": min(ok),
        "max": max(ok),
        "n": len(ok),
    }


def _train(s: Setting, method: Method, epsilon, lr, clip, seed: int, steps: int, batch_size: int) -> dict:
    if method.first_order:
        return train_first_order(s, epsilon, lr, clip, seed, steps, batch_size)
    return train_once(s, method, epsilon, lr, clip, seed, steps, batch_size)


def run_method(
    s: Setting,
    method: Method,
    epsilon: float | None,
    grid: Grid,
    seeds: int,
    steps: int,
    batch_size: int,
    log,
    points: list[tuple[float, float | None]] | None = None,
    progress=None,
) -> dict:
    """Grid on seed 0 (dev accuracy picks), then the chosen point with every seed (test).
    ``points`` replaces the grid (e.g. a point transferred from another row); ``progress(runs)`` sees
    every finished run (a long benchmark saves them as it goes)."""
    tried = []
    for lr, clip in points if points is not None else grid.points(method):
        r = _train(s, method, epsilon, lr, clip, 0, steps, batch_size)
        tried.append({"lr": lr, "clip": clip, **r})
        if progress is not None:
            progress(tried)
        log(
            f"    grid lr={lr:.4g} C={clip if clip is None else round(clip, 4)}: dev {r['dev']['accuracy']:.4f} "
            f"test {r['test']['accuracy']:.4f} ({r['train_seconds']:.1f} s)"
        )
    best = max(tried, key=lambda r: (_finite(r["dev"]["accuracy"]), -_finite(r["dev"]["loss"], math.inf)))
    runs = [best]
    for seed in range(1, seeds):
        r = _train(s, method, epsilon, best["lr"], best["clip"], seed, steps, batch_size)
        runs.append({"lr": best["lr"], "clip": best["clip"], "seed": seed, **r})
        log(f"    seed {seed}: test {r['test']['accuracy']:.4f} ({r['train_seconds']:.1f} s)")
        if progress is not None:
            progress([*tried, *runs[1:]])
    test = [r["test"]["accuracy"] for r in runs]
    log(
        f"  {method.label} eps={epsilon}: lr={best['lr']:.4g} C={best['clip']} test {summarize(test)['mean']:.4f} "
        f"± {summarize(test)['std']:.4f} over {len(runs)} seeds"
    )
    seconds = [r["train_seconds"] for r in runs]
    return {
        "method": method.name,
        "label": method.label,
        "K": method.K,
        "private": method.private,
        "setting": method.setting,
        "first_order": method.first_order,
        "epsilon": epsilon,
        "grid": [{k: r[k] for k in ("lr", "clip", "dev", "test", "fraction_clipped", "train_seconds")} for r in tried],
        "chosen": {"lr": best["lr"], "clip": best["clip"]},
        "seeds": [
            {"seed": i, "test": r["test"], "dev": r["dev"], "train_seconds": r["train_seconds"]}
            for i, r in enumerate(runs)
        ],
        "test_accuracy": summarize(test),
        "forwards_per_run": best["forwards"],
        "passes_per_run": best["passes"],
        "noise_multiplier": best["noise_multiplier"],
        "epsilon_spent": best["epsilon_spent"],
        "fraction_clipped": best["fraction_clipped"],
        "train_seconds": summarize(seconds),  # the chosen point's runs: wall time to the reported accuracy
        "trainable_numel": s.flat.numel,
        "saved_weights_bytes": s.info["saved_weights_bytes"],
        "extra_training_bytes": best.get("extra_training_bytes"),
        **({"opacus_mode": best["opacus_mode"]} if method.first_order else {}),
    }


def _finite(x: float, default: float = -math.inf) -> float:
    return x if math.isfinite(x) else default


def claim(rows: list[dict], epsilons: Sequence[float]) -> list[dict]:
    """DP-AggZO (K >= 16) against DPZero at the same ε: margin of the means against the seed spread."""
    out = []
    rows = [r for r in rows if _k_row(r)]  # the claim is DP-AggZO against DPZero, on the same trainable subset
    for eps in epsilons:
        base = next((r for r in rows if r["private"] and r["K"] == 1 and r["epsilon"] == eps), None)
        for r in rows:
            if base is None or not r["private"] or r["K"] < 16 or r["epsilon"] != eps:
                continue
            margin = r["test_accuracy"]["mean"] - base["test_accuracy"]["mean"]
            spread = max(x["test_accuracy"]["max"] - x["test_accuracy"]["min"] for x in (r, base))
            out.append(
                {"epsilon": eps, "K": r["K"], "margin": margin, "seed_spread": spread, "holds": bool(margin > spread)}
            )
    return out


def _k_row(r: dict) -> bool:
    """A row of the accuracy-against-K comparison: ZO on the head subset, no stage schedule."""
    return r.get("method") not in STAGEWISE and r.get("setting", "head") == "head" and not r.get("first_order")


def _peft_row(r: dict) -> bool:
    """A row of the PEFT comparison: LoRA (ZO or DP-AdamW), or DP-AdamW on the head subset."""
    return r.get("setting") == "lora" or bool(r.get("first_order"))


CLOSE = 0.02  # "within a point or two" (the paper's claim for DP-AggZO K = 64 against DP-AdamW)


def peft_claim(rows: list[dict], epsilons: Sequence[float]) -> list[dict]:
    """DP-AggZO + LoRA against DP-AdamW + the same LoRA at the same ε: accuracy gap, time and memory ratios."""
    out = []
    for eps in epsilons:
        fo = next((r for r in rows if r.get("first_order") and r["setting"] == "lora" and r["epsilon"] == eps), None)
        for r in rows:
            if fo is None or r.get("first_order") or r.get("setting") != "lora" or r["epsilon"] != eps:
                continue
            gap = fo["test_accuracy"]["mean"] - r["test_accuracy"]["mean"]
            spread = max(x["test_accuracy"]["max"] - x["test_accuracy"]["min"] for x in (r, fo))
            zo_bytes, fo_bytes = r["extra_training_bytes"]["total"], fo["extra_training_bytes"]["total"]
            out.append(
                {
                    "epsilon": eps,
                    "K": r["K"],
                    "dp_adamw_minus_dp_aggzo": gap,
                    "seed_spread": spread,
                    "within_two_points": bool(gap <= CLOSE),
                    "train_seconds_ratio": r["train_seconds"]["mean"] / fo["train_seconds"]["mean"],
                    "extra_training_bytes_ratio": zo_bytes / fo_bytes if fo_bytes else None,
                }
            )
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    peft = any(_peft_row(r) for t in tasks for r in t["methods"])
    fig, axes = plt.subplots(2 if peft else 1, len(tasks), figsize=(5.2 * len(tasks), 8 if peft else 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        if not any(r["private"] and _k_row(r) for r in t["methods"]):
            ax.axis("off")  # a PEFT-only run: no accuracy-against-K line
            continue
        for eps, color in zip(results["config"]["epsilons"], ("tab:blue", "tab:orange", "tab:green")):
            pts = sorted(
                (r["K"], r["test_accuracy"]) for r in t["methods"] if r["private"] and _k_row(r) and r["epsilon"] == eps
            )
            ks = [k for k, _ in pts]
            ax.errorbar(
                ks,
                [a["mean"] for _, a in pts],
                yerr=[a["std"] for _, a in pts],
                marker="o",
                capsize=3,
                color=color,
                label=f"DP-AggZO, ε={eps:g} (K=1: DPZero)",
            )
        for r in t["methods"]:
            if not r["private"]:
                ax.axhline(r["test_accuracy"]["mean"], color="gray", linestyle="--", label=r["label"])
        ax.axhline(t["untrained"]["test"]["accuracy"], color="black", linestyle=":", label="untrained")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["K"] for r in t["methods"] if r["private"] and _k_row(r)}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("K (directions per step)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{t['task']} ({results['config']['steps']} steps, E|B|={results['config']['batch_size']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if peft:
        for ax, t in zip(axes[1], tasks):
            _plot_peft(ax, t, results["config"])
    fig.suptitle(f"{results['config']['model']}, δ=1e-5: accuracy against K (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_peft(ax, t: dict, config: dict) -> None:
    """Test accuracy against the wall time of a training run, one point per PEFT-comparison row."""
    rows = [r for r in t["methods"] if _peft_row(r) or (_k_row(r) and r["K"] in config.get("peft_ks", ()))]
    markers = {("head", False): "o", ("lora", False): "s", ("head", True): "^", ("lora", True): "D"}
    for r in rows:
        a, sec = r["test_accuracy"], r["train_seconds"]
        key = (r.get("setting", "head"), bool(r.get("first_order")))
        color = "tab:red" if r.get("first_order") else "tab:blue"
        ax.errorbar(sec["mean"], a["mean"], yerr=a["std"], marker=markers[key], color=color, capsize=3)
        saved = r["saved_weights_bytes"] / 1e6
        ax.annotate(f"{r['label']}, ε={r['epsilon']:g}\n{saved:.2f} MB saved", (sec["mean"], a["mean"]), fontsize=6,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.axhline(t["untrained"]["test"]["accuracy"], color="black", linestyle=":", label="untrained")
    ax.set_xscale("log")
    ax.set_xlabel(f"wall time of one {config['steps']}-step run (s, {config['threads']} thread)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{t['task']}: LoRA vs head only, DP-AggZO vs DP-AdamW", fontsize=9)
    ax.grid(alpha=0.3)


def print_table(results: dict) -> None:
    print(
        f"\n{'task':<18} {'method':<30} {'eps':>4} {'test acc (mean ± std, min–max)':>34} {'lr':>8} {'C':>7} "
        f"{'fwd/run':>8}"
    )
    for t in results["tasks"]:
        u = t["untrained"]["test"]["accuracy"]
        print(f"{t['task']:<18} {'untrained':<30} {'-':>4} {u:>34.4f}")
        for r in t["methods"]:
            a = r["test_accuracy"]
            acc = f"{a['mean']:.4f} ± {a['std']:.4f} ({a['min']:.3f}–{a['max']:.3f})"
            clip = "-" if r["chosen"]["clip"] is None else f"{r['chosen']['clip']:.3g}"
            eps = "-" if r["epsilon"] is None else f"{r['epsilon']:g}"
            extra = ""
            if _peft_row(r) or "train_seconds" in r:
                extra = f" {r['train_seconds']['mean']:>8.1f}s {r['saved_weights_bytes'] / 1e6:>8.2f}MB"
            print(
                f"{'':<18} {r['label']:<30} {eps:>4} {acc:>34} {r['chosen']['lr']:>8.3g} {clip:>7} "
                f"{r['forwards_per_run']:>8}{extra}"
            )
        for c in t["claim"]:
            verdict = "holds" if c["holds"] else "does NOT hold"
            print(
                f"{'':<18} claim eps={c['epsilon']:g} K={c['K']}: margin {c['margin']:+.4f} vs seed spread "
                f"{c['seed_spread']:.4f} -> {verdict}"
            )
        for c in t.get("peft_claim", []):
            verdict = "within two points" if c["within_two_points"] else "NOT within two points"
            memory = c["extra_training_bytes_ratio"]
            print(
                f"{'':<18} LoRA eps={c['epsilon']:g}: DP-AdamW - DP-AggZO K={c['K']} = "
                f"{c['dp_adamw_minus_dp_aggzo']:+.4f} ({verdict}; seed spread {c['seed_spread']:.4f}); "
                f"time x{c['train_seconds_ratio']:.2f}, extra memory x{memory if memory is None else round(memory, 4)}"
            )


def _size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def peft_markdown(results: dict) -> str:
    """The PEFT comparison of a results JSON as Markdown (the README's table is this output, not typed):
    per row test accuracy, wall time of one run, weights saved and extra training memory, then the
    DP-AggZO + LoRA against DP-AdamW + LoRA check."""
    config = results["config"]
    lines = [
        "| task | method | ε | test accuracy | lr | C | wall time / run | weights saved | extra training memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for t in results["tasks"]:
        u = t["untrained"]["test"]["accuracy"]
        lines.append(f"| {t['task']} | untrained | – | {u:.3f} | – | – | – | – | – |")
        rows = [r for r in t["methods"] if _peft_row(r) or (_k_row(r) and r["K"] in config.get("peft_ks", ()))]
        for r in rows:
            a, sec = r["test_accuracy"], r["train_seconds"]
            clip = "–" if r["chosen"]["clip"] is None else f"{r['chosen']['clip']:g}"
            eps = "–" if r["epsilon"] is None else f"{r['epsilon']:g}"
            extra = r.get("extra_training_bytes") or {}
            memory = _size(extra["total"]) if "total" in extra else "–"
            lines.append(
                f"| | {r['label']} | {eps} | {a['mean']:.3f} ± {a['std']:.3f} ({a['min']:.3f}–{a['max']:.3f}) | "
                f"{r['chosen']['lr']:g} | {clip} | {sec['mean']:.1f} s | {_size(r['saved_weights_bytes'])} | {memory} |"
            )
        for c in t.get("peft_claim", []):
            verdict = "within two points" if c["within_two_points"] else "not within two points"
            memory = c["extra_training_bytes_ratio"]
            checks.append(
                f"- {t['task']}, ε = {c['epsilon']:g}: DP-AdamW + LoRA minus DP-AggZO (K = {c['K']}) + LoRA = "
                f"{100 * c['dp_adamw_minus_dp_aggzo']:+.1f} points ({verdict}; the larger seed range is "
                f"{100 * c['seed_spread']:.1f} points). DP-AggZO's run takes {c['train_seconds_ratio']:.2f}x "
                f"DP-AdamW's wall time"
                + ("" if memory is None else f"; its extra training memory is {100 * memory:.2g} % of DP-AdamW's")
                + "."
            )
    return "\n".join(lines + (["", *checks] if checks else [])) + "\n"


TASK_DEFAULTS = {  # max_length, k_shot (None: the task's default); tweets: 512 per class, as in the committed results
    "tweet-sentiment": (48, 512),
    "tweet-sentiment-3": (48, 512),
    "snli": (64, None),
    "bbc-topics": (128, None),
}


def write_partial(
    out: Path, results: dict, task: str, rows: list[dict], label: str = "", epsilon=None, runs: list[dict] = ()
) -> None:
    """A long run keeps what it has measured: the rows so far, and the finished runs of the current row."""
    now: dict = {"task": task, "methods": rows}
    if runs:
        keep = ("lr", "clip", "seed", "dev", "test", "train_seconds", "extra_training_bytes")
        now["in_progress"] = {
            "label": label,
            "epsilon": epsilon,
            "runs": [{k: r[k] for k in keep if k in r} for r in runs],
        }
    partial = {**results, "partial": True, "tasks": [*results["tasks"], now]}
    out.write_text(json.dumps(partial, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="tweet-sentiment,snli")
    p.add_argument("--model", default="minilm")
    p.add_argument("--trainable", default="head", help="must leave the transformer blocks frozen (features replay)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="expected Poisson batch size q*n")
    p.add_argument("--ks", default="1,4,16,64")
    p.add_argument("--epsilons", default="2,6")
    p.add_argument("--lrs", default="0.005,0.02", help="learning rates at K=1; K directions use lr*sqrt(K)")
    p.add_argument("--betas", default="1,4", help="clipping scales: C = beta/sqrt(K)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--stages", type=int, default=3, help="DP-ZOSO and DP-ZOPO rows (K=1): stages; 0 drops the rows")
    p.add_argument("--keep-fraction", type=float, default=0.01, help="DP-ZOPO row: static data-free mask")
    p.add_argument("--mezo", action=argparse.BooleanOptionalAction, default=True, help="the non-private MeZO row")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small ops)")
    g = p.add_argument_group("PEFT comparison (rows added with --peft lora)")
    g.add_argument("--peft", choices=("none", "lora"), default="none", help="add DP-AggZO + LoRA and DP-AdamW rows")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-layers", default="last:1", help="must leave the lower blocks frozen (features replay)")
    g.add_argument("--target-modules", default=None, help="comma-separated; PEFT's default (query, value) if not given")
    g.add_argument("--peft-ks", default="64", help="K of the DP-AggZO + LoRA rows")
    g.add_argument(
        "--peft-grid",
        choices=("transfer", "full"),
        default="transfer",
        help="transfer: DP-AggZO + LoRA reuses the (lr, C) the head-only row at the same K and ε chose (one point: "
        "a LoRA forward costs a transformer block, not a classifier); full: the --lrs x --betas grid",
    )
    g.add_argument("--peft-seeds", type=int, default=None, help="seeds of the DP-AggZO + LoRA rows [--seeds]")
    g.add_argument(
        "--first-order",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DP-AdamW (Opacus) rows on the head subset and, with --peft, on the same LoRA [on with --peft]",
    )
    g.add_argument("--fo-lrs", default="0.001,0.003,0.01", help="DP-AdamW learning rates")
    g.add_argument("--fo-clips", default="0.5,2", help="DP-AdamW clipping thresholds C (per-example gradient L2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 steps, one grid point, 2 seeds, 2 Ks")
    p.add_argument("--out", type=Path)
    p.add_argument("--markdown", type=Path, metavar="JSON", help="print the PEFT rows of JSON as Markdown; no run")
    args = p.parse_args(argv)
    if args.markdown:
        print(peft_markdown(json.loads(args.markdown.read_text())), end="")
        return {}
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.seeds, args.ks, args.lrs, args.betas = 8, 2, "1,16", "0.01", "4"
        args.peft_ks, args.fo_lrs, args.fo_clips = "16", "0.003", "1"
    ks = [int(k) for k in args.ks.split(",")]
    peft_ks = [int(k) for k in args.peft_ks.split(",")] if args.peft != "none" else []
    epsilons = [float(e) for e in args.epsilons.split(",")]
    grid = Grid(tuple(float(x) for x in args.lrs.split(",")), tuple(float(x) for x in args.betas.split(",")))
    fo_points = [(float(lr), float(c)) for lr in args.fo_lrs.split(",") for c in args.fo_clips.split(",")]
    first_order = args.peft != "none" if args.first_order is None else args.first_order
    methods = [Method("dpzero" if k == 1 else "dp-aggzo", k) for k in ks]
    methods += [Method("mezo", 1, private=False)] if args.mezo else []
    if args.stages:
        methods += [Method("dp-zoso", 1, stages=args.stages)]
        methods += [Method("dp-zopo", 1, stages=args.stages, keep_fraction=args.keep_fraction)]
    methods += [Method("dp-adamw", 0)] if first_order else []
    methods += [Method("dp-adamw", 0, setting="lora")] if first_order and args.peft != "none" else []
    methods += [Method("dp-aggzo", k, setting="lora") for k in peft_ks]  # the costliest rows last
    adapter = None
    if args.peft != "none":
        from dpzo_engine.models.adapters import split_names

        adapter = AdapterOptions(
            kind=args.peft, r=args.lora_r, alpha=args.lora_alpha, layers=args.lora_layers,
            target_modules=split_names(args.target_modules),
        )  # fmt: skip
    started = time.perf_counter()
    results: dict = {
        "benchmark": "utility",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": common.device_label(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python bench/utility.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {
            "model": args.model,
            "trainable": args.trainable,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "ks": ks,
            "epsilons": epsilons,
            "delta": DELTA,
            "zo_eps": ZO_EPS,
            "difference": "central",
            "directions": "gaussian",
            "seeds": args.seeds,
            "stagewise": {"stages": args.stages, "lr_decay": 0.5, "keep_fraction": args.keep_fraction},
            "mezo": args.mezo,
            "peft": None if adapter is None else dataclasses.asdict(adapter),
            "peft_ks": peft_ks,
            "peft_grid": args.peft_grid,
            "peft_seeds": args.peft_seeds or args.seeds,
            "first_order": {"points": fo_points, "opacus_mode": "auto"} if first_order else None,
            "threads": args.threads,
            "quick": args.quick,
            "grid": {
                "lrs_at_K1": grid.lrs,
                "lr_rule": "lr * sqrt(K)",
                "betas": grid.betas,
                "clip_rule": "beta/sqrt(K)",
            },
        },
        "protocol": (
            "per method and epsilon: every grid point trained once (seed 0) and scored on dev; the best dev accuracy "
            "picks the point, trained again with seeds 1..S-1; test accuracy mean/std/min/max over the S seeds. "
            "Seeds set the public direction stream; sampling and noise use OS entropy. The hyperparameter search "
            "is NOT privately accounted (as in the papers): each run's epsilon covers that run only."
        ),
        "timing": "train_seconds: perf_counter around the training loop of one run (shared 2-core CPU: noisy)",
        "memory": (
            "extra_training_bytes: what training holds beyond an inference forward, measured in the run. "
            "DP-AdamW: the bytes autograd saves for backward in one step (largest over the run, one entry per "
            "storage, weights excluded; Opacus' own hook buffers not counted), plus gradients (the trainable "
            "bytes) and the AdamW moments (measured in the optimizer state). DP-AggZO: the per-example "
            "derivative matrix D [B, K]; it keeps no activations, gradients or moments."
        ),
        "peft_protocol": (
            "DP-AggZO + LoRA: with --peft-grid transfer, the (lr, C) the head-only DP-AggZO row chose at the same "
            "K and epsilon, trained with --peft-seeds seeds (no grid of its own). DP-AdamW rows: the --fo-lrs x "
            "--fo-clips grid, then the chosen point with --seeds seeds. Frozen blocks replayed as for ZO: their "
            "features are computed once in eval mode, the trained top runs in train mode (dropout) for DP-AdamW."
        ),
        "load_average": {"start": os.getloadavg()},
        "tasks": [],
    }
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    model_tag = "" if args.model == "minilm" else "_" + re.sub(r"[^a-z0-9]+", "-", Path(args.model).name.lower())
    out = args.out or RESULTS_DIR / f"utility_{results['device']}{model_tag}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for task_name in args.tasks.split(","):
        max_length, k_shot = TASK_DEFAULTS.get(task_name, (64, None))
        log(f"{task_name}: loading and computing frozen features ...")
        task = get_task(task_name, seed=0, k_shot=k_shot)  # data seed 0: the default splits
        s = load_setting(task, args.model, args.trainable, max_length)
        s.info["replay_max_abs_loss_difference"] = check_replay_is_exact(s)
        log(
            f"  {s.info['task']['sizes']}, {s.info['trainable_numel']} trainable parameters, "
            f"replay exact to {s.info['replay_max_abs_loss_difference']:.2e} ({s.info['setup_seconds']} s)"
        )
        untrained = {"dev": scores(s, "dev"), "test": scores(s, "test")}
        settings = {"head": s}
        if adapter is not None:
            settings["lora"] = load_setting(task, args.model, args.trainable, max_length, adapter)
            lora = settings["lora"]
            lora.info["replay_max_abs_loss_difference"] = check_replay_is_exact(lora)
            log(
                f"  LoRA: {lora.info['trainable_numel']} trainable parameters, {lora.info['frozen_blocks_replayed']} "
                f"blocks replayed, exact to {lora.info['replay_max_abs_loss_difference']:.2e}"
            )
        rows = []
        for method in methods:
            for eps in epsilons if method.private else [None]:
                points, seeds = (fo_points if method.first_order else None), args.seeds
                if method.setting == "lora" and not method.first_order:
                    seeds = args.peft_seeds or args.seeds
                    if args.peft_grid == "transfer":
                        head = next(r for r in rows if _k_row(r) and r["K"] == method.K and r["epsilon"] == eps)
                        points = [(head["chosen"]["lr"], head["chosen"]["clip"])]
                row = run_method(
                    settings[method.setting], method, eps, grid, seeds, args.steps, args.batch_size, log, points,
                    progress=functools.partial(write_partial, out, results, task_name, rows, method.label, eps),
                )  # fmt: skip
                rows.append(row)
                results["load_average"].setdefault("after_rows", []).append(os.getloadavg()[0])
                write_partial(out, results, task_name, rows)
        results["tasks"].append(
            {
                "task": task_name,
                "setting": s.info,
                **({"lora_setting": settings["lora"].info} if "lora" in settings else {}),
                "untrained": untrained,
                "methods": rows,
                "claim": claim(rows, epsilons),
                "peft_claim": peft_claim(rows, epsilons),
            }
        )
    results["load_average"]["end"] = os.getloadavg()
    results["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print_table(results)
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {results['seconds']} s")
    return results


if __name__ == "__main__":
    main()
