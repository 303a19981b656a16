"""Training configuration: one dataclass, the CLI flags that set it, and its validation.

A config file (JSON or YAML, ``--config``) may set the same keys (underscored or
dashed); flags given on the command line win.  Validation happens before anything is
written, so bad input ends with one line on stderr and nothing half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .. import ops
from ..core import stream
from ..core.errors import ConfigError
from ..zo.private_zo import ZOOptions
from ..zo.stagewise import StageOptions

METHODS = ("dp-aggzo", "dpzero", "dp-aggzo-perdir", "dp-zoso", "dp-zopo", "mezo", "dp-adamw", "adamw")
PRIVATE_METHODS = ("dp-aggzo", "dpzero", "dp-aggzo-perdir", "dp-zoso", "dp-zopo", "dp-adamw")
STAGEWISE_METHODS = ("dp-zoso", "dp-zopo")  # DP-AggZO's rule + stage schedule (+ mask): stagewise.py
CLIPPINGS = ("auto", "joint", "per-direction")
FIRST_ORDER_METHODS = ("dp-adamw", "adamw")  # backprop baselines (dpzo_engine/first_order.py)
OPACUS_MODES = ("auto", "ghost", "fast", "hooks")
DEFAULT_LR = {"zo": 5e-2, "first_order": 5e-4}  # when --lr is not given (zo: tuned for the embedded default)
# K when --num-directions is not given: the papers' settings (DP-AggZO K = 64; the others one direction)
DEFAULT_DIRECTIONS = {"dp-aggzo": 64, "dp-aggzo-perdir": 64}
DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    # what to train
    model: str = "minilm"
    task: str = "tweet-sentiment"
    data_dir: str | None = None
    head: str = "auto"  # loss head (see heads.HEAD_CHOICES); auto: from the task and the kind of model
    k_shot: int | None = None  # training examples per class (LM-BFF); None: the task's default
    num_train: int | None = None  # training examples in all (MeZO: 1000); excludes k_shot
    num_dev: int | None = None  # with num_train: dev examples drawn from train too (MeZO: 500)
    data_seed: int | None = None  # seed of the data splits (LM-BFF: 13, 21, 42, 87, 100); None: --seed
    max_new_tokens: int = 50  # causal-generation: greedy decoding budget when evaluating
    trainable: str = "head"
    max_length: int | None = None  # tokens per example; None: the task's (tweets 48, classification 128, SQuAD 512)
    dtype: str = "float32"
    device: str = "auto"
    backend: str = "auto"
    # method
    method: str = "dp-aggzo"
    num_directions: int | None = None  # None: DEFAULT_DIRECTIONS (64 for DP-AggZO), else 1
    difference: str = "central"
    direction_kind: str = "gaussian"
    zo_eps: float = 1e-3
    lr: float | None = None  # None: DEFAULT_LR of the method's family
    rounding: str = "auto"
    clipping: str = "auto"  # private ZO: per-direction for dp-aggzo-perdir, else joint
    # stagewise schedule and data-free mask (dp-zoso, dp-zopo); None: the method's default
    stages: int | None = None  # 3
    lr_decay: float | None = None  # 0.5
    zo_scale_start: float | None = None  # --zo-eps
    zo_scale_end: float | None = None  # zo_scale_start
    prox: float = 0.0
    keep_fraction: float | None = None  # 0.01 (dp-zopo)
    mask_strategy: str | None = None  # static (dp-zopo)
    prune_queries: int | None = None  # 4 (dp-zopo)
    rank_bins: int | None = None  # 0 (dp-zopo)
    # first-order baselines (dp-adamw, adamw)
    weight_decay: float = 0.0
    opacus_mode: str = "auto"
    physical_batch_size: int | None = None  # None: each Poisson batch in one forward/backward
    # privacy
    epsilon: float = 2.0
    delta: float = 1e-5
    clip: float = 1.0
    sample_rate: float | None = None
    batch_size: int | None = None  # None with no sample_rate: 128
    count_share: float = 0.0
    noise_seed: int | None = None
    # schedule
    steps: int = 100
    seed: int = 0
    eval_every: int = 0
    log_every: int = 10
    save_every: int = 25
    eval_batch_size: int = 64
    max_eval_examples: int | None = None
    output_dir: str = "runs/default"
    resume: bool = False

    @property
    def private(self) -> bool:
        return self.method in PRIVATE_METHODS

    @property
    def clip_mode(self) -> str:
        if self.clipping != "auto":
            return self.clipping.replace("-", "_")
        return "per_direction" if self.method == "dp-aggzo-perdir" else "joint"

    def update_rounding(self) -> str:
        """Stochastic rounding for bf16 updates (else updates below half an ulp vanish)."""
        if self.rounding != "auto":
            return self.rounding
        return "stochastic" if self.dtype == "bfloat16" else "nearest"

    def stage_options(self) -> StageOptions:
        """The stage schedule, mask and proximal term this config asks for, as plain values."""
        staged = self.method in STAGEWISE_METHODS
        return StageOptions(
            steps=self.steps,
            lr=self.lr,
            zo_eps=self.zo_eps,
            seed=self.seed,
            kind=self.direction_kind,
            rounding=self.update_rounding(),
            stages=self.stages if staged else None,
            lr_decay=self.lr_decay if self.lr_decay is not None else 0.5,
            zo_scale_start=self.zo_scale_start,
            zo_scale_end=self.zo_scale_end,
            prox=self.prox,
            mask=self.method == "dp-zopo",
            keep_fraction=self.keep_fraction if self.keep_fraction is not None else 0.01,
            mask_strategy=self.mask_strategy or "static",
            prune_queries=self.prune_queries if self.prune_queries is not None else 4,
            rank_bins=self.rank_bins if self.rank_bins is not None else 0,
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
        )

    def identity(self) -> dict:
        """The keys that define a run: a resume must match them exactly."""
        d = dataclasses.asdict(self)
        for k in ("resume", "output_dir", "eval_every", "log_every", "save_every", "eval_batch_size", "device"):
            d.pop(k)
        return d

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _finite_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"--{name} must be a positive finite number, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field; resolve method-implied values (DPZero has K = 1)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {cfg.method!r}")
    if cfg.num_directions is None:
        cfg.num_directions = DEFAULT_DIRECTIONS.get(cfg.method, 1)
    if cfg.method == "dpzero" and cfg.num_directions != 1:
        raise ConfigError("--method dpzero uses one direction per step; drop --num-directions or set it to 1")
    if not isinstance(cfg.num_directions, int) or not 1 <= cfg.num_directions <= ops.MAX_DIRECTIONS_PER_PASS - 1:
        raise ConfigError(f"--num-directions must be an integer in [1, {ops.MAX_DIRECTIONS_PER_PASS - 1}]")
    if cfg.lr is None:
        cfg.lr = DEFAULT_LR["first_order" if cfg.method in FIRST_ORDER_METHODS else "zo"]
    if cfg.method in FIRST_ORDER_METHODS:
        _validate_first_order(cfg)
    for name in ("zo_eps", "lr", "clip"):
        _finite_positive(name.replace("_", "-"), getattr(cfg, name))
    if cfg.private:
        _finite_positive("epsilon", cfg.epsilon)
        if not (isinstance(cfg.delta, int | float) and 0 < cfg.delta < 1):
            raise ConfigError(f"--delta must be in (0, 1), got {cfg.delta!r}")
    if not 0 <= cfg.count_share < 1:
        raise ConfigError(f"--count-share must be in [0, 1), got {cfg.count_share!r}")
    if cfg.sample_rate is not None:
        if cfg.batch_size is not None:
            raise ConfigError("give --sample-rate or --batch-size, not both")
        if not 0 < cfg.sample_rate <= 1:
            raise ConfigError(f"--sample-rate must be in (0, 1], got {cfg.sample_rate!r}")
    elif cfg.batch_size is None:
        cfg.batch_size = 128
    if cfg.batch_size is not None and not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
        raise ConfigError(f"--batch-size must be a positive integer, got {cfg.batch_size!r}")
    _validate_task_options(cfg)
    for name in ("steps", "max_length", "eval_batch_size", "log_every", "save_every"):
        v = getattr(cfg, name)
        if v is None and name == "max_length":
            continue  # the task's length
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.eval_every < 0:
        raise ConfigError("--eval-every must be >= 0 (0: evaluate only at the end)")
    choices = {
        "difference": ("central", "forward"),
        "direction_kind": stream.KINDS,
        "dtype": DTYPES,
        "backend": ops.BACKENDS,
        "rounding": ("auto", *ops.ROUNDINGS),
    }
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")
    _validate_stagewise(cfg)
    return cfg


def _validate_task_options(cfg: TrainConfig) -> None:
    """--head and the data sizes (issue 4: the papers' heads and tasks)."""
    from ..heads import HEAD_CHOICES

    if cfg.head not in HEAD_CHOICES:
        raise ConfigError(f"--head must be one of {', '.join(HEAD_CHOICES)}; got {cfg.head!r}")
    for name in ("k_shot", "num_train", "num_dev", "max_new_tokens"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.k_shot is not None and cfg.num_train is not None:
        raise ConfigError("give --k-shot (examples per class) or --num-train (examples in all), not both")
    if cfg.data_seed is not None and not isinstance(cfg.data_seed, int):
        raise ConfigError(f"--data-seed must be an integer, got {cfg.data_seed!r}")


def _validate_stagewise(cfg: TrainConfig) -> None:
    """--clipping and the DP-ZOSO/DP-ZOPO knobs: resolve defaults, refuse them where they'd be ignored."""
    from ..zo.pruning import check_options
    from ..zo.schedules import StageSchedule

    if cfg.clipping not in CLIPPINGS:
        raise ConfigError(f"--clipping must be one of {', '.join(CLIPPINGS)}; got {cfg.clipping!r}")
    if cfg.clipping != "auto" and (not cfg.private or cfg.method in FIRST_ORDER_METHODS):
        raise ConfigError(f"--clipping applies to the private ZO methods, not to --method {cfg.method}")
    if cfg.method == "dp-aggzo-perdir" and cfg.clipping == "joint":
        raise ConfigError("--method dp-aggzo-perdir clips per direction; use --method dp-aggzo for joint clipping")
    stage_keys = ("stages", "lr_decay", "zo_scale_start", "zo_scale_end")
    mask_keys = ("keep_fraction", "mask_strategy", "prune_queries", "rank_bins")
    given = [k for k in (*stage_keys, *mask_keys) if getattr(cfg, k) is not None] + (["prox"] if cfg.prox else [])
    if cfg.method not in STAGEWISE_METHODS:
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to --method dp-zoso or dp-zopo only")
        return
    masked = [k for k in given if k in mask_keys]
    if cfg.method != "dp-zopo" and masked:
        raise ConfigError(f"--{masked[0].replace('_', '-')} applies to --method dp-zopo only (DP-ZOSO has no mask)")
    if not (isinstance(cfg.prox, int | float) and math.isfinite(cfg.prox) and cfg.prox >= 0):
        raise ConfigError(f"--prox must be a finite number >= 0, got {cfg.prox!r}")
    cfg.stages = 3 if cfg.stages is None else cfg.stages
    cfg.lr_decay = 0.5 if cfg.lr_decay is None else cfg.lr_decay
    cfg.zo_scale_start = cfg.zo_eps if cfg.zo_scale_start is None else cfg.zo_scale_start
    cfg.zo_scale_end = cfg.zo_scale_start if cfg.zo_scale_end is None else cfg.zo_scale_end
    StageSchedule(cfg.steps, cfg.stages, cfg.lr, cfg.zo_scale_start, cfg.zo_scale_end, cfg.lr_decay)  # checks them
    if cfg.method == "dp-zopo":
        cfg.keep_fraction = 0.01 if cfg.keep_fraction is None else cfg.keep_fraction
        cfg.mask_strategy = "static" if cfg.mask_strategy is None else cfg.mask_strategy
        cfg.prune_queries = 4 if cfg.prune_queries is None else cfg.prune_queries
        cfg.rank_bins = 0 if cfg.rank_bins is None else cfg.rank_bins
        check_options(cfg.keep_fraction, cfg.mask_strategy, cfg.prune_queries, cfg.rank_bins)


def _validate_first_order(cfg: TrainConfig) -> None:
    """The first-order baselines' own knobs. Resume and replay are ZO features: a first-order checkpoint
    would have to hold the AdamW moments (twice the model), and its updates are not a function of public seeds."""
    if cfg.resume:
        raise ConfigError(
            f"--resume is not supported for --method {cfg.method} (first-order runs keep no checkpoints); "
            "start again in a fresh --output-dir"
        )
    if cfg.opacus_mode not in OPACUS_MODES:
        raise ConfigError(f"--opacus-mode must be one of {', '.join(OPACUS_MODES)}; got {cfg.opacus_mode!r}")
    if cfg.method == "adamw" and cfg.opacus_mode != "auto":
        raise ConfigError("--opacus-mode applies to --method dp-adamw only (adamw is not private)")
    wd = cfg.weight_decay
    if not (isinstance(wd, int | float) and math.isfinite(wd) and wd >= 0):
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {wd!r}")
    pb = cfg.physical_batch_size
    if pb is not None and not (isinstance(pb, int) and pb >= 1):
        raise ConfigError(f"--physical-batch-size must be a positive integer, got {pb!r}")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m dpzo_engine.train",
        description="Differentially private zeroth-order fine-tuning (DP-AggZO, DPZero, MeZO). "
        "With no arguments: MiniLM-L6 on real tweet sentiment, DP-AggZO at epsilon=2, delta=1e-5.",
    )
    a = p.add_argument
    a("--config", help="JSON or YAML file with the same keys as these flags")
    a("--model", help=f"local model directory, 'minilm' (offline, from PyPI), or a hub id when online [{d.model}]")
    a("--task", help=f"task name (see README) [{d.task}]")
    a("--data-dir", help="directory or file with the task's data (local layouts: CSV, TSV, JSONL, load_from_disk)")
    a("--head", help="loss head: auto, sequence-classification, mlm-prompt, causal-prompt, causal-generation [auto]")
    a("--k-shot", type=int, help="training examples per class (LM-BFF; also picks data/k-shot/<TASK>/<k>-<seed>/)")
    a("--num-train", type=int, help="training examples in all, drawn at random (MeZO's 1000)")
    a("--num-dev", type=int, help="with --num-train: dev examples drawn from the training set too [500]")
    a("--data-seed", type=int, help="seed of the data splits (LM-BFF: 13, 21, 42, 87, 100) [--seed]")
    a("--max-new-tokens", type=int, help=f"causal-generation: tokens decoded per answer [{d.max_new_tokens}]")
    a(
        "--trainable",
        help=f"which parameters train: all, head, last:N, bias, layernorm, re:<regex>; comma-joined [{d.trainable}]",
    )
    a(
        "--max-length",
        type=int,
        help="tokens per example; longer ones are truncated [the task's: tweets 48, "
        "classification 128, BoolQ 384, SQuAD 512]",
    )
    a("--dtype", help=f"parameter dtype: {', '.join(DTYPES)} [{d.dtype}]")
    a("--device", help="cpu, cuda, or auto [auto]")
    a("--backend", help=f"kernel backend: {', '.join(ops.BACKENDS)} [{d.backend}]")
    a("--method", help=f"{', '.join(METHODS)} [{d.method}]")
    a("--num-directions", "-K", type=int, help="K directions per step [64 for dp-aggzo(-perdir), else 1]")
    a("--difference", help=f"central (2K forwards) or forward (K+1 forwards) [{d.difference}]")
    a("--direction-kind", help=f"gaussian or rademacher directions [{d.direction_kind}]")
    a("--zo-eps", type=float, help=f"perturbation scale lambda [{d.zo_eps}]")
    lr_defaults = f"{DEFAULT_LR['zo']:g} for ZO methods, {DEFAULT_LR['first_order']:g} for dp-adamw and adamw"
    a("--lr", type=float, help=f"learning rate [{lr_defaults}]")
    a("--rounding", help="update rounding: auto (stochastic for bf16), nearest, stochastic [auto]")
    a("--weight-decay", type=float, help=f"AdamW decoupled weight decay (dp-adamw, adamw) [{d.weight_decay}]")
    a(
        "--opacus-mode",
        help="dp-adamw per-example clipping: auto (ghost, or fast when parameters are tied), ghost, fast, hooks [auto]",
    )
    a("--physical-batch-size", type=int, help="dp-adamw/adamw: split each Poisson batch into chunks of this size")
    a("--clipping", help="ZO clipping: auto (per-direction for dp-aggzo-perdir, else joint), joint, per-direction")
    a("--stages", type=int, help="dp-zoso/dp-zopo: S stages of doubling length I, 2I, 4I, ... covering --steps [3]")
    a("--lr-decay", type=float, help="dp-zoso/dp-zopo: learning-rate factor at each stage boundary [0.5]")
    a("--zo-scale-start", type=float, help="dp-zoso/dp-zopo: lambda of the first stage [--zo-eps]")
    a("--zo-scale-end", type=float, help="dp-zoso/dp-zopo: lambda of the last stage, geometric in between [start]")
    a("--prox", type=float, help="dp-zoso/dp-zopo: proximal weight rho towards the stage's start (keeps a copy) [0]")
    a("--keep-fraction", type=float, help="dp-zopo: fraction of trainable parameters the mask trains [0.01]")
    a("--mask-strategy", help="dp-zopo: static, dynamic (new mask each stage), incremental (mask grows) [static]")
    a("--prune-queries", type=int, help="dp-zopo: ZO probes of the data-free score [4]")
    a("--rank-bins", type=int, help="dp-zopo: rank multipliers 1.2..0.8 in N bins, N bits per parameter (0: off) [0]")
    a("--epsilon", type=float, help=f"target epsilon [{d.epsilon}]")
    a("--delta", type=float, help=f"target delta [{d.delta}]")
    a(
        "--clip",
        type=float,
        help=f"clipping threshold C on the per-example K-vector scaled by 1/K (dp-adamw: on the gradient) [{d.clip}]",
    )
    a("--sample-rate", type=float, help="Poisson sampling rate q (instead of --batch-size)")
    a("--batch-size", type=int, help="expected batch size q*n [128]")
    a("--count-share", type=float, help="share of epsilon spent on a Laplace-noised dataset size (0: n public) [0]")
    a("--noise-seed", type=int, help="DEBUG ONLY: fixed seed for sampling and noise; the run is then NOT private")
    a("--steps", type=int, help=f"training steps T [{d.steps}]")
    a("--seed", type=int, help=f"public master seed for directions and data splits [{d.seed}]")
    a("--eval-every", type=int, help="evaluate on the dev split every N steps (0: only at the end) [0]")
    a("--log-every", type=int, help=f"log metrics every N steps [{d.log_every}]")
    a("--save-every", type=int, help=f"checkpoint every N steps [{d.save_every}]")
    a("--eval-batch-size", type=int, help=f"[{d.eval_batch_size}]")
    a("--max-eval-examples", type=int, help="cap on test examples evaluated")
    a("--output-dir", help=f"where the run goes [{d.output_dir}]")
    a("--resume", action="store_true", help="continue the run in --output-dir after an interruption")
    return p


def _load_config_file(path: str) -> dict:
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = f.read_text()
        if f.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ConfigError(f"config file {path} could not be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values = _load_config_file(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config" and v is not False}
    values.update(given)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    return validate(TrainConfig(**values))
