"""Training configuration: the TrainConfig dataclass is the one source of every flag.

Each field is declared with ``option(default, help, group=...)``; the parser
(``build_parser``), the config-file keys (``--config``, JSON or YAML, underscored or dashed,
values coerced to the field's type) and the README's flag table all come from it. Flags
given on the command line win over the file. ``validate`` checks every field and resolves
the defaults that depend on other values (K per method, lr per family, batch size,
stagewise options) in one place, before anything is written or loaded.

Adding a flag: add a field to TrainConfig in the section of its group,

    my_knob: float | None = option(None, "what it does and why one would set it", group="method",
                                   shown="what None resolves to")

with the type it takes (bool, int, float or str, optionally ``| None``), ``choices=`` when its
values are enumerated (a tuple, or a callable for a registry), ``aliases=("-k",)`` for short
names and ``identity=False`` if a resumed run may change it. Then check it in ``validate``
(ranges, combinations) and resolve it there if its default depends on other values, use it
where it applies, and regenerate the README's table: ``python -m dpzo_engine.run.config README.md``
(a test fails while the table is stale).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops
from ..core import stream
from ..core.errors import ConfigError
from ..data import TASKS
from ..data.squad import SQUAD_MAX_LENGTH
from ..data.tasks import DEFAULT_MAX_LENGTH, TWEET_MAX_LENGTH
from ..heads import HEAD_CHOICES
from ..models.adapters import PEFT_KINDS, AdapterOptions, check_options, split_names
from ..models.step_forward import COMPILE_CHOICES, GPU_BATCH_MULTIPLE
from ..zo import pruning
from ..zo.guard import DEFAULT_MAX_GROWTH
from ..zo.parallel import PARALLEL_MODES
from ..zo.private_zo import (
    DEFAULT_DIRECTIONS,
    DEFAULT_STAGES,
    DEFAULT_ZO_LR,
    STAGEWISE_METHODS,
    ZOOptions,
    default_clip_mode,
    default_directions,
)
from ..zo.stagewise import StageOptions
from . import options, reporting
from .options import UINT64, option

METHODS = ("dp-aggzo", "dpzero", "dp-aggzo-perdir", "dp-zoso", "dp-zopo", "mezo", "dp-adamw", "adamw")
PRIVATE_METHODS = ("dp-aggzo", "dpzero", "dp-aggzo-perdir", "dp-zoso", "dp-zopo", "dp-adamw")
CLIPPINGS = ("auto", "joint", "per-direction")
FIRST_ORDER_METHODS = ("dp-adamw", "adamw")  # backprop baselines (run/first_order/)
OPACUS_MODES = ("auto", "ghost", "fast", "hooks")
DTYPES = ("float32", "bfloat16")

# Defaults that depend on other values, resolved in ``validate`` (and quoted by the help texts).
# (The ZO methods' own defaults live beside ZOOptions, which the Python API fills the same way.)
DEFAULT_LR = {"zo": DEFAULT_ZO_LR, "first_order": 5e-4}  # when --lr is not given
DEFAULT_BATCH_SIZE = 128  # when neither --batch-size nor --sample-rate is given
# The PRV accountant's grid grows with T: 1e8 steps calibrate in ~10 s and 0.4 GB, 1e9 in ~50 s and 1 GB,
# 1e12 does not finish. At K = 64 a ledger line is ~5 KB, so 1e8 steps would also write ~500 GB.
MAX_STEPS = 10**8
_STAGE = {f.name: f.default for f in dataclasses.fields(StageOptions)}
_ZO = {f.name: f.default for f in dataclasses.fields(ZOOptions)}
STAGE_DEFAULTS = {  # dp-zoso / dp-zopo, when not given (the rest as StageOptions has them)
    "stages": DEFAULT_STAGES,
    "lr_decay": _STAGE["lr_decay"],
    "keep_fraction": _STAGE["keep_fraction"],
    "mask_strategy": _STAGE["mask_strategy"],
    "prune_queries": _STAGE["prune_queries"],
    "rank_bins": _STAGE["rank_bins"],
}
MASK_KEYS = ("keep_fraction", "mask_strategy", "prune_queries", "rank_bins")

GROUPS = {  # argument groups of --help and the README, in this order
    "data": "model and data",
    "method": "method",
    "peft": "parameter-efficient fine-tuning (LoRA, prefix-tuning through PEFT)",
    "privacy": "privacy",
    "stagewise": "stagewise schedule and pruning (dp-zoso, dp-zopo)",
    "first_order": "first-order baselines (dp-adamw, adamw)",
    "bookkeeping": "evaluation, logging and output",
    "scale_out": "scale-out (under torchrun; docs/distributed.md)",
}


def _lr_defaults() -> str:
    return f"{DEFAULT_LR['zo']:g} for ZO methods, {DEFAULT_LR['first_order']:g} for dp-adamw and adamw"


def _k_defaults() -> str:
    by_k: dict[int, list[str]] = {}
    for method, k in DEFAULT_DIRECTIONS.items():
        by_k.setdefault(k, []).append(method)
    return ", ".join(f"{k} for {' and '.join(ms)}" for k, ms in by_k.items()) + ", else 1"


_ADAPTER = AdapterOptions()  # the adapter's defaults, quoted by the --peft flags' help


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model and data
    model: str = option(
        "minilm", "local model directory, 'minilm' (offline, from PyPI), or a hub id when online", group="data"
    )
    task: str = option("tweet-sentiment", "task name (see the task table)", group="data", choices=lambda: tuple(TASKS))
    data_dir: str | None = option(
        None,
        "directory or file with the task's data (local layouts: CSV, TSV, JSONL, load_from_disk)",
        group="data",
        shown="the task's own source",
        metavar="PATH",
    )
    train_file: str | None = option(
        None,
        "your training file: CSV or TSV with a header row, or JSON Lines (with --task local)",
        group="data",
        metavar="PATH",
    )
    validation_file: str | None = option(
        None, "your dev file", group="data", shown="a tenth of each class of --train-file", metavar="PATH"
    )
    test_file: str | None = option(
        None,
        "your test file",
        group="data",
        shown="a tenth of each class of --train-file, drawn with a fixed seed",
        metavar="PATH",
    )
    text_column: str | None = option(
        None, "column holding the text", group="data", shown="text, sentence, premise, ...", metavar="NAME"
    )
    text_pair_column: str | None = option(
        None,
        "column holding a second text (an NLI hypothesis, a question)",
        group="data",
        shown="hypothesis beside premise, sentence2 beside sentence1, ...",
        metavar="NAME",
    )
    label_column: str | None = option(
        None,
        "column holding the label (names or integers)",
        group="data",
        shown="label, gold_label, sentiment, ...",
        metavar="NAME",
    )
    template: str | None = option(
        None,
        "prompt heads: where the text and the label word go, e.g. '{text} It was {mask}.'",
        group="data",
        shown="the task's",
    )
    label_words: str | None = option(
        None,
        "prompt heads: one word per class, in label order ('terrible,great') or by label "
        "('negative=terrible,positive=great')",
        group="data",
        shown="the task's, else the label names",
    )
    head: str = option(
        "auto", "loss head; auto: from the task and the kind of model", group="data", choices=HEAD_CHOICES
    )
    k_shot: int | None = option(
        None,
        "training examples per class (LM-BFF; also picks data/k-shot/<TASK>/<k>-<seed>/)",
        group="data",
        shown="the task's",
    )
    num_train: int | None = option(
        None, "training examples in all, drawn at random (MeZO's 1000); excludes --k-shot", group="data"
    )
    num_dev: int | None = option(
        None, "with --num-train: dev examples drawn from the training set too", group="data", shown="the task's"
    )
    data_seed: int | None = option(
        None,
        "seed of the data splits (LM-BFF: 13, 21, 42, 87, 100)",
        group="data",
        shown="--seed",
        bounds=UINT64,
    )
    max_length: int | None = option(
        None,
        "tokens per example; longer ones are truncated, and a note on stderr says how many training "
        "examples fill it (a local diagnostic, written to no file)",
        group="data",
        shown=f"the task's: tweets {TWEET_MAX_LENGTH}, classification {DEFAULT_MAX_LENGTH}, CB and BBC 256, "
        f"BoolQ 384, SQuAD {SQUAD_MAX_LENGTH}",
    )
    max_new_tokens: int = option(50, "causal-generation: tokens decoded greedily per answer", group="data")
    trainable: str | None = option(
        None,
        "which parameters train: all, head, last:N, bias, layernorm, embeddings, re:<regex>; comma-joined. "
        "With --peft: the whole modules trained and saved beside the adapter, or none",
        group="data",
        shown="head; none with --peft",
    )
    dtype: str = option("float32", "parameter dtype", group="data", choices=DTYPES)
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)", group="data", identity=False)
    # ---------------------------------------------------------------- method
    method: str = option("dp-aggzo", "training method (see Methods)", group="method", choices=METHODS)
    num_directions: int | None = option(
        None, "K directions per step", group="method", aliases=("-K",), shown=_k_defaults()
    )
    difference: str = option(
        "central",
        "central: 2K forwards, 2K+1 passes over θ, 4K-1 direction values generated per weight; "
        "forward: K+1 forwards, K+1 passes, 3K-1 values",
        group="method",
        choices=("central", "forward"),
    )
    direction_kind: str = option(
        "gaussian",
        "distribution of the directions; rademacher (±1 from single random bits) is far cheaper to generate",
        group="method",
        choices=stream.KINDS,
    )
    zo_eps: float = option(_ZO["zo_eps"], "perturbation scale λ", group="method")
    lr: float | None = option(None, "learning rate η", group="method", shown=_lr_defaults())
    rounding: str = option(
        "auto", "update rounding; auto: stochastic for bfloat16", group="method", choices=("auto", *ops.ROUNDINGS)
    )
    backend: str = option("auto", "kernel backend", group="method", choices=ops.BACKENDS)
    direction_cache_gb: float = option(
        0.0,
        "memory (GB; 4 bytes per cached weight) that keeps the direction being evaluated, so that it is not "
        "generated again: 2K-1 direction values per weight and step instead of 4K-1, the same bits; Gaussian "
        "directions on the CPU backend (README: The direction cache)",
        group="method",
        identity=False,  # the cache never changes a bit: a resumed run may use another
    )
    compile: str = option(
        "auto",
        "run each step's forwards under torch.compile; auto: on for CUDA (with CUDA graphs), off on the CPU, "
        "where compiling takes longer than it saves in short runs (README: Forwards)",
        group="method",
        choices=COMPILE_CHOICES,
        identity=False,
    )
    batch_multiple: int | None = option(
        None,
        "pad each Poisson batch to a multiple of N rows (repeats of its first example, cut off before the losses "
        "are used) so that compiled shapes repeat",
        group="method",
        shown=f"{GPU_BATCH_MULTIPLE} with CUDA graphs, else 1",
        bounds=(1, 1 << 16),
        identity=False,
    )
    steps: int = option(
        100,
        f"training steps T (at most {MAX_STEPS:.0e}); 0 evaluates the model on the test split, without training",
        group="method",
    )
    seed: int = option(0, "public master seed of the directions and the data splits", group="method", bounds=UINT64)
    # ---------------------------------------------------------------- parameter-efficient fine-tuning
    peft: str = option(
        "none",
        "train a LoRA or prefix-tuning adapter built with PEFT instead of the model's weights; the run saves the "
        "adapter (PEFT's format)",
        group="peft",
        choices=PEFT_KINDS,
    )
    lora_r: int | None = option(None, "LoRA rank r", group="peft", shown=str(_ADAPTER.r))
    lora_alpha: float | None = option(
        None, "LoRA scale: the update is (alpha/r)·BA", group="peft", shown=f"{_ADAPTER.alpha:g}"
    )
    lora_dropout: float | None = option(
        None,
        "LoRA dropout; must be 0 for the ZO methods (the two losses of a derivative need one deterministic "
        "function), may be set for dp-adamw",
        group="peft",
        shown=f"{_ADAPTER.dropout:g}",
    )
    target_modules: str | None = option(
        None,
        "modules LoRA adapts: comma-separated names (matched as suffixes) or re:<regex> (matched in full)",
        group="peft",
        shown="PEFT's for the architecture: the query and value projections",
    )
    lora_layers: str | None = option(
        None,
        "blocks LoRA adapts: all, last:N (the blocks below then run once per step), or indices i,j,...",
        group="peft",
        shown=_ADAPTER.layers,
    )
    num_virtual_tokens: int | None = option(
        None, "prefix-tuning: virtual key/value tokens per block", group="peft", shown=str(_ADAPTER.num_virtual_tokens)
    )
    merge_adapter: bool = option(
        False,
        "--peft lora: also save the adapter merged into a plain transformers model (model-merged/)",
        group="peft",
        identity=False,
    )
    # ---------------------------------------------------------------- privacy
    epsilon: float = option(2.0, "target ε; σ is calibrated for it with the PRV accountant", group="privacy")
    delta: float = option(1e-5, "target δ", group="privacy")
    clip: float = option(
        _ZO["clip"],
        "clipping threshold C: L2 bound on each example's K-vector after the 1/K scale (dp-adamw: on the gradient)",
        group="privacy",
    )
    clipping: str = option(
        "auto",
        "ZO clipping; auto: per-direction for dp-aggzo-perdir, else joint",
        group="privacy",
        choices=CLIPPINGS,
    )
    sample_rate: float | None = option(None, "Poisson sampling rate q (instead of --batch-size)", group="privacy")
    batch_size: int | None = option(
        None,
        "expected batch size q·n (instead of --sample-rate); with --count-share, q = batch size / ñ",
        group="privacy",
        shown=str(DEFAULT_BATCH_SIZE),
    )
    count_share: float = option(
        0.0,
        "share of ε spent on a noisy dataset size ñ (discrete Laplace), keeping n private (0: n is public)",
        group="privacy",
    )
    noise_seed: int | None = option(
        None,
        "DEBUG ONLY: fixed seed for sampling and noise; the run is then NOT private: a warning says so, and "
        "the ledger, summary.json and the model card say 'not private' instead of an ε",
        group="privacy",
        bounds=UINT64,
    )
    # ---------------------------------------------------------------- stagewise (dp-zoso, dp-zopo)
    stages: int | None = option(
        None,
        "S stages of doubling length I, 2I, 4I, ... covering --steps",
        group="stagewise",
        shown=str(STAGE_DEFAULTS["stages"]),
    )
    lr_decay: float | None = option(
        None, "learning-rate factor at each stage boundary", group="stagewise", shown=f"{STAGE_DEFAULTS['lr_decay']:g}"
    )
    zo_scale_start: float | None = option(None, "λ of the first stage", group="stagewise", shown="--zo-eps")
    zo_scale_end: float | None = option(
        None, "λ of the last stage, geometric in between", group="stagewise", shown="--zo-scale-start"
    )
    prox: float = option(0.0, "proximal weight ρ towards the stage's start (keeps a copy of θ)", group="stagewise")
    keep_fraction: float | None = option(
        None,
        "dp-zopo: fraction of the trainable parameters the data-free mask trains",
        group="stagewise",
        shown=f"{STAGE_DEFAULTS['keep_fraction']:g}",
    )
    mask_strategy: str | None = option(
        None,
        "dp-zopo: static mask, dynamic (new mask each stage) or incremental (the mask grows)",
        group="stagewise",
        choices=pruning.STRATEGIES,
        shown=STAGE_DEFAULTS["mask_strategy"],
    )
    prune_queries: int | None = option(
        None, "dp-zopo: ZO probes of the data-free score", group="stagewise", shown=str(STAGE_DEFAULTS["prune_queries"])
    )
    rank_bins: int | None = option(
        None,
        "dp-zopo: rank multipliers 1.2..0.8 in N bins, N bits per parameter (0: off)",
        group="stagewise",
        shown=str(STAGE_DEFAULTS["rank_bins"]),
    )
    # ---------------------------------------------------------------- first-order baselines
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", group="first_order")
    opacus_mode: str = option(
        "auto",
        "dp-adamw per-example clipping; auto: ghost, or fast when parameters are tied",
        group="first_order",
        choices=OPACUS_MODES,
    )
    physical_batch_size: int | None = option(
        None,
        "split each Poisson batch into chunks of this size",
        group="first_order",
        shown="each batch in one forward/backward",
    )
    # ---------------------------------------------------------------- evaluation, logging and output
    eval_every: int = option(
        0,
        "evaluate on the dev split every N steps (0: only the test split, at the end)",
        group="bookkeeping",
        identity=False,
    )
    eval_batch_size: int = option(64, "examples per evaluation batch", group="bookkeeping", identity=False)
    max_eval_examples: int | None = option(
        None, "cap on the examples of each evaluation (at least 1)", group="bookkeeping", shown="all"
    )
    max_weight_growth: float = option(
        DEFAULT_MAX_GROWTH,
        "divergence guard: stop when rms of the trained weights exceeds this many times max(its start, λ); "
        "0: stop only when they are not finite",
        group="bookkeeping",
        identity=False,  # a run the guard stopped may be resumed with a wider band
    )
    log_every: int = option(
        10, "log metrics (and compute ε exactly) every N steps", group="bookkeeping", identity=False
    )
    save_every: int = option(25, "checkpoint every N steps", group="bookkeeping", identity=False)
    output_dir: str = option("runs/default", "where the run goes", group="bookkeeping", identity=False, metavar="DIR")
    resume: bool = option(
        False,
        "continue the run in --output-dir after an interruption, from its own config.json (flags given too must "
        "agree on what defines the run); released steps are re-applied from the ledger, never recomputed",
        group="bookkeeping",
        identity=False,
    )
    report_to: str = option(
        "none",
        "also log the metrics to TensorBoard, in --output-dir/tensorboard (needs the tensorboard package)",
        group="bookkeeping",
        choices=reporting.REPORT_TO,
        identity=False,
    )
    # ---------------------------------------------------------------- scale-out (none of it changes the result)
    parallel: str | None = option(
        None,
        "how the ranks of a torchrun job split each step's forwards: by data, by directions, or 2d (both); "
        "the ledger and the model do not depend on it",
        group="scale_out",
        choices=PARALLEL_MODES,
        shown="one rank",
        identity=False,
    )
    direction_ranks: int | None = option(
        None,
        "--parallel 2d: ranks that split the K directions (world size / R ranks split the data)",
        group="scale_out",
        identity=False,
        metavar="R",
    )
    collective_timeout: float = option(
        600.0,
        "seconds a rank waits in a collective for a dead or stuck peer before the job fails",
        group="scale_out",
        identity=False,
    )

    @property
    def private(self) -> bool:
        return self.method in PRIVATE_METHODS

    @property
    def clip_mode(self) -> str:
        if self.clipping != "auto":
            return self.clipping.replace("-", "_")
        return default_clip_mode(self.method)

    def update_rounding(self) -> str:
        """Stochastic rounding for bf16 updates (else updates below half an ulp vanish)."""
        if self.rounding != "auto":
            return self.rounding
        return "stochastic" if self.dtype == "bfloat16" else "nearest"

    def stage_options(self) -> StageOptions:
        """The stage schedule, mask and proximal term this config asks for, as plain values."""
        staged = self.method in STAGEWISE_METHODS
        given = {k: getattr(self, k) for k in STAGE_DEFAULTS if k != "stages" and getattr(self, k) is not None}
        return StageOptions(
            steps=self.steps,
            lr=self.lr,
            zo_eps=self.zo_eps,
            seed=self.seed,
            kind=self.direction_kind,
            rounding=self.update_rounding(),
            stages=self.stages if staged else None,
            zo_scale_start=self.zo_scale_start,
            zo_scale_end=self.zo_scale_end,
            prox=self.prox,
            mask=self.method == "dp-zopo",
            **given,
        )

    def adapter_options(self) -> AdapterOptions | None:
        """The adapter --peft asks for, as plain values (None: no adapter)."""
        if self.peft == "none":
            return None
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return AdapterOptions(
            kind=self.peft,
            r=pick(self.lora_r, _ADAPTER.r),
            alpha=pick(self.lora_alpha, _ADAPTER.alpha),
            dropout=pick(self.lora_dropout, _ADAPTER.dropout),
            target_modules=split_names(self.target_modules),
            layers=pick(self.lora_layers, _ADAPTER.layers),
            num_virtual_tokens=pick(self.num_virtual_tokens, _ADAPTER.num_virtual_tokens),
            trainable=self.trainable,
        )

    def zo_options(self) -> ZOOptions:
        """The ZO step's knobs as plain values (``PrivateZO``)."""
        return ZOOptions(
            method=self.method,
            num_directions=self.num_directions,
            lr=self.lr,
            zo_eps=self.zo_eps,
            clip=self.clip,
            clip_mode=self.clip_mode,
            difference=self.difference,
            direction_kind=self.direction_kind,
            rounding=self.update_rounding(),
            backend=self.backend,
            seed=self.seed,
            stages=self.stage_options(),
            max_weight_growth=self.max_weight_growth,
            direction_cache_gb=self.direction_cache_gb,
        )

    def identity(self) -> dict:
        """The keys that define a run: a resume must match them exactly (bookkeeping may change)."""
        d = dataclasses.asdict(self)
        for f in options.flags(TrainConfig):
            if not f.identity:
                d.pop(f.name)
        return d

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _finite_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--{name} must be a positive finite number, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field (types and choices first: a TrainConfig built in Python gets the CLI's
    checks too), then resolve the defaults that depend on other values."""
    options.check_types(cfg)
    _check_method_flags(cfg)
    resolve_defaults(cfg)
    _validate_peft(cfg)
    if cfg.method == "dpzero" and cfg.num_directions != 1:
        raise ConfigError("--method dpzero uses one direction per step; drop --num-directions or set it to 1")
    if not 1 <= cfg.num_directions <= ops.MAX_DIRECTIONS_PER_PASS - 1:
        raise ConfigError(f"--num-directions must be an integer in [1, {ops.MAX_DIRECTIONS_PER_PASS - 1}]")
    if cfg.method in FIRST_ORDER_METHODS:
        _validate_first_order(cfg)
    if not (math.isfinite(cfg.direction_cache_gb) and cfg.direction_cache_gb >= 0):
        raise ConfigError(f"--direction-cache-gb must be a finite number >= 0, got {cfg.direction_cache_gb!r}")
    if cfg.direction_cache_gb > 0 and cfg.direction_kind != "gaussian":
        raise ConfigError("--direction-cache-gb serves Gaussian directions; Rademacher signs cost less to generate")
    for name in ("zo_eps", "lr", "clip"):
        _finite_positive(name.replace("_", "-"), getattr(cfg, name))
    if cfg.private:
        _finite_positive("epsilon", cfg.epsilon)
        if not 0 < cfg.delta < 1:
            raise ConfigError(f"--delta must be in (0, 1), got {cfg.delta!r}")
    if not 0 <= cfg.count_share < 1:
        raise ConfigError(f"--count-share must be in [0, 1), got {cfg.count_share!r}")
    if cfg.sample_rate is not None:
        if cfg.batch_size is not None:
            raise ConfigError("give --sample-rate or --batch-size, not both")
        if not 0 < cfg.sample_rate <= 1:
            raise ConfigError(f"--sample-rate must be in (0, 1], got {cfg.sample_rate!r}")
    elif cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {cfg.batch_size!r}")
    _validate_task_options(cfg)
    if cfg.steps < 0:
        raise ConfigError(f"--steps must be an integer >= 0 (0: evaluate only), got {cfg.steps!r}")
    for name in ("max_length", "eval_batch_size", "log_every", "save_every"):
        v = getattr(cfg, name)
        if v is not None and v < 1:  # max_length None: the task's length
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.eval_every < 0:
        raise ConfigError("--eval-every must be >= 0 (0: evaluate only at the end)")
    _validate_limits(cfg)
    _validate_stagewise(cfg)
    _validate_device(cfg.device)
    reporting.require(cfg.report_to)
    if cfg.direction_ranks is not None and cfg.direction_ranks < 1:
        raise ConfigError(f"--direction-ranks must be a positive integer, got {cfg.direction_ranks!r}")
    _finite_positive("collective-timeout", cfg.collective_timeout)  # fit to the world size and K: Layout.make
    return cfg


def _validate_device(name: str) -> None:
    """A device torch can name (cpu, cuda, cuda:N, mps, ...) or auto, refused here rather than as a
    RuntimeError once the data and the model have loaded. Whether it is present is checked at set-up."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N (a torch device), got {name!r}") from None


def _validate_limits(cfg: TrainConfig) -> None:
    """Sizes a run can actually reach: a plan the accountant can calibrate, a non-empty evaluation."""
    if cfg.steps > MAX_STEPS:
        raise ConfigError(
            f"--steps must be at most {MAX_STEPS:.0e} (privacy accounting and the ledger), got {cfg.steps}"
        )
    if cfg.max_eval_examples is not None and cfg.max_eval_examples < 1:
        raise ConfigError(
            f"--max-eval-examples must be at least 1 (omit it to evaluate all), got {cfg.max_eval_examples}"
        )
    g = cfg.max_weight_growth
    if not (math.isfinite(g) and (g == 0 or g > 1)):
        raise ConfigError(f"--max-weight-growth must be 0 (finiteness only) or a finite number > 1, got {g!r}")


FIRST_ORDER_KEYS = ("weight_decay", "opacus_mode", "physical_batch_size")
ZO_KEYS = ("num_directions", "zo_eps", "difference", "direction_kind", "direction_cache_gb")


def _check_method_flags(cfg: TrainConfig) -> None:
    """A flag the chosen method would ignore is refused: whoever set it believes it acts.  Run before the
    defaults are resolved, so that a key left unset (None, or its default) is not mistaken for a given one."""
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    first_order = cfg.method in FIRST_ORDER_METHODS
    for key in ZO_KEYS if first_order else FIRST_ORDER_KEYS:
        if getattr(cfg, key) != default[key]:
            where = "the zeroth-order methods" if first_order else "--method dp-adamw or adamw only"
            raise ConfigError(f"--{key.replace('_', '-')} applies to {where}, not to --method {cfg.method}")


def resolve_defaults(cfg: TrainConfig) -> None:
    """The one place where defaults that depend on other values are filled in (fields left None).
    Stagewise options are refused for the other methods first, so they are only filled for theirs."""
    if cfg.num_directions is None:
        cfg.num_directions = default_directions(cfg.method)
    if cfg.lr is None:
        cfg.lr = DEFAULT_LR["first_order" if cfg.method in FIRST_ORDER_METHODS else "zo"]
    if cfg.sample_rate is None and cfg.batch_size is None:
        cfg.batch_size = DEFAULT_BATCH_SIZE
    if cfg.trainable is None:  # with an adapter, the adapter alone (a sequence classifier always trains beside it)
        cfg.trainable = "head" if cfg.peft == "none" else "none"
    _check_stagewise_applies(cfg)
    if cfg.method in STAGEWISE_METHODS:
        keys = STAGE_DEFAULTS if cfg.method == "dp-zopo" else {k: STAGE_DEFAULTS[k] for k in ("stages", "lr_decay")}
        for key, default in keys.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, default)
        cfg.zo_scale_start = cfg.zo_eps if cfg.zo_scale_start is None else cfg.zo_scale_start
        cfg.zo_scale_end = cfg.zo_scale_start if cfg.zo_scale_end is None else cfg.zo_scale_end


def _validate_task_options(cfg: TrainConfig) -> None:
    """The data sizes (issue 4: the papers' heads and tasks)."""
    for name in ("k_shot", "num_train", "num_dev", "max_new_tokens"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.k_shot is not None and cfg.num_train is not None:
        raise ConfigError("give --k-shot (examples per class) or --num-train (examples in all), not both")


def _check_stagewise_applies(cfg: TrainConfig) -> None:
    """--clipping and the DP-ZOSO/DP-ZOPO knobs: refused where they would be ignored."""
    if cfg.clipping != "auto" and (not cfg.private or cfg.method in FIRST_ORDER_METHODS):
        raise ConfigError(f"--clipping applies to the private ZO methods, not to --method {cfg.method}")
    if cfg.method == "dp-aggzo-perdir" and cfg.clipping == "joint":
        raise ConfigError("--method dp-aggzo-perdir clips per direction; use --method dp-aggzo for joint clipping")
    stage_keys = ("stages", "lr_decay", "zo_scale_start", "zo_scale_end")
    given = [k for k in (*stage_keys, *MASK_KEYS) if getattr(cfg, k) is not None] + (["prox"] if cfg.prox else [])
    if cfg.method not in STAGEWISE_METHODS:
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to --method dp-zoso or dp-zopo only")
        return
    masked = [k for k in given if k in MASK_KEYS]
    if cfg.method != "dp-zopo" and masked:
        raise ConfigError(f"--{masked[0].replace('_', '-')} applies to --method dp-zopo only (DP-ZOSO has no mask)")


def _validate_stagewise(cfg: TrainConfig) -> None:
    """The resolved DP-ZOSO/DP-ZOPO schedule and mask options."""
    from ..zo.schedules import StageSchedule

    if cfg.method not in STAGEWISE_METHODS:
        return
    if not (math.isfinite(cfg.prox) and cfg.prox >= 0):
        raise ConfigError(f"--prox must be a finite number >= 0, got {cfg.prox!r}")
    StageSchedule(cfg.steps, cfg.stages, cfg.lr, cfg.zo_scale_start, cfg.zo_scale_end, cfg.lr_decay)  # checks them
    if cfg.method == "dp-zopo":
        pruning.check_options(cfg.keep_fraction, cfg.mask_strategy, cfg.prune_queries, cfg.rank_bins)


LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_layers")


def _validate_peft(cfg: TrainConfig) -> None:
    """--peft and its knobs: refused where they would be ignored, checked where they apply."""
    given = [k for k in (*LORA_KEYS, "num_virtual_tokens") if getattr(cfg, k) is not None]
    wrong = [k for k in given if (k in LORA_KEYS) != (cfg.peft == "lora")]
    if wrong:
        kind = "lora" if wrong[0] in LORA_KEYS else "prefix"
        raise ConfigError(f"--{wrong[0].replace('_', '-')} applies to --peft {kind} only")
    if cfg.merge_adapter and cfg.peft != "lora":
        why = "prefix-tuning's virtual key/values are inputs, not weights" if cfg.peft == "prefix" else "no adapter"
        raise ConfigError(f"--merge-adapter applies to --peft lora only ({why})")
    if cfg.peft == "none":
        return
    if cfg.peft == "prefix" and cfg.method in FIRST_ORDER_METHODS:
        raise ConfigError(f"--peft prefix is not supported with --method {cfg.method}; use --peft lora")
    if cfg.method in STAGEWISE_METHODS:
        raise ConfigError(f"--peft is not supported with --method {cfg.method} (its mask and anchor assume no adapter)")
    check_options(cfg.adapter_options(), zeroth_order=cfg.method not in FIRST_ORDER_METHODS)  # one error: line


def _validate_first_order(cfg: TrainConfig) -> None:
    """The first-order baselines' own knobs. Resume and replay are ZO features: a first-order checkpoint
    would have to hold the AdamW moments (twice the model), and its updates are not a function of public seeds."""
    if cfg.resume:
        raise ConfigError(
            f"--resume is not supported for --method {cfg.method} (first-order runs keep no checkpoints); "
            "start again in a fresh --output-dir"
        )
    if cfg.method == "adamw" and cfg.opacus_mode != "auto":
        raise ConfigError("--opacus-mode applies to --method dp-adamw only (adamw is not private)")
    wd = cfg.weight_decay
    if not (math.isfinite(wd) and wd >= 0):
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {wd!r}")
    pb = cfg.physical_batch_size
    if pb is not None and pb < 1:
        raise ConfigError(f"--physical-batch-size must be a positive integer, got {pb!r}")


def build_parser(prog: str = "python -m dpzo_engine.train") -> argparse.ArgumentParser:
    """The trainer's parser, generated from TrainConfig (groups, choices, aliases, defaults in the help)."""
    p = options.build_parser(
        TrainConfig,
        GROUPS,
        prog=prog,
        usage="%(prog)s [--config FILE] [flags]",
        description="Differentially private zeroth-order fine-tuning (DP-AggZO, DPZero, MeZO, DP-ZOSO, "
        "DP-ZOPO; DP-AdamW and AdamW as baselines). With no arguments: MiniLM-L6 on real tweet sentiment, "
        "DP-AggZO at epsilon=2, delta=1e-5. Defaults are in [brackets].",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or YAML file with the same keys as the flags (underscored or dashed); flags given here win",
    )
    return p


def _saved_run_config(output_dir: str) -> dict:
    """The config a run saved (``--resume`` starts from it, so ``--resume --output-dir RUN`` is enough)."""
    path = Path(output_dir) / "config.json"
    if not path.is_file():
        return {}  # the run directory check says what is missing
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {path} could not be read: {exc}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} does not hold a config")
    saved.pop("resume", None)
    return options.coerce_mapping(TrainConfig, saved, f"--resume: {path}")


def parse_args(argv: list[str] | None = None, prog: str = "python -m dpzo_engine.train") -> TrainConfig:
    """Flags over config-file keys over, with ``--resume``, the run's own saved config, over the
    dataclass defaults, validated."""
    given = vars(build_parser(prog).parse_args(argv))
    path = given.pop("config", None)
    values = options.load_config_file(TrainConfig, path) if path else {}
    if given.get("resume"):
        output_dir = given.get("output_dir", values.get("output_dir", TrainConfig.output_dir))
        values = {**_saved_run_config(output_dir), **values}
    values.update(given)
    return validate(TrainConfig(**values))


def flag_reference() -> str:
    """The README's flag tables (Markdown), generated from TrainConfig."""
    return options.flag_table(TrainConfig, GROUPS)


README_BEGIN = "<!-- flags: generated by python -m dpzo_engine.run.config README.md -->"
README_END = "<!-- flags end -->"


def _write_readme(path: str) -> None:
    """Replace the README's flag tables (between the two markers) with the generated ones."""
    text = Path(path).read_text()
    head, sep, rest = text.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not (sep and sep2):
        raise SystemExit(f"{path} has no flag-table markers ({README_BEGIN} ... {README_END})")
    Path(path).write_text(f"{head}{README_BEGIN}\n{flag_reference()}{README_END}{tail}")


if __name__ == "__main__":
    if len(sys.argv) == 2:
        _write_readme(sys.argv[1])
    else:
        print(flag_reference(), end="")
