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

from . import ops, stream
from .errors import UserError

METHODS = ("dp-aggzo", "dpzero", "dp-aggzo-perdir", "mezo")
PRIVATE_METHODS = ("dp-aggzo", "dpzero", "dp-aggzo-perdir")
DTYPES = ("float32", "bfloat16")


class ConfigError(UserError, ValueError):
    """Invalid user input: reported as one line, exit code 2."""


@dataclass
class TrainConfig:
    # what to train
    model: str = "minilm"
    task: str = "tweet-sentiment"
    data_dir: str | None = None
    trainable: str = "head,last:1"
    max_length: int = 48
    dtype: str = "float32"
    device: str = "auto"
    backend: str = "auto"
    # method
    method: str = "dp-aggzo"
    num_directions: int | None = None  # None: 1 for dpzero, 4 otherwise
    difference: str = "central"
    direction_kind: str = "gaussian"
    zo_eps: float = 1e-3
    lr: float = 2e-2
    rounding: str = "auto"
    # privacy
    epsilon: float = 2.0
    delta: float = 1e-5
    clip: float = 1.0
    sample_rate: float | None = None
    batch_size: int | None = None  # None with no sample_rate: 32
    count_share: float = 0.0
    noise_seed: int | None = None
    # schedule
    steps: int = 150
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
        return "per_direction" if self.method == "dp-aggzo-perdir" else "joint"

    def update_rounding(self) -> str:
        """Stochastic rounding for bf16 updates (else updates below half an ulp vanish)."""
        if self.rounding != "auto":
            return self.rounding
        return "stochastic" if self.dtype == "bfloat16" else "nearest"

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
        cfg.num_directions = 1 if cfg.method == "dpzero" else 4
    if cfg.method == "dpzero" and cfg.num_directions != 1:
        raise ConfigError("--method dpzero uses one direction per step; drop --num-directions or set it to 1")
    if not isinstance(cfg.num_directions, int) or not 1 <= cfg.num_directions <= ops.MAX_DIRECTIONS_PER_PASS - 1:
        raise ConfigError(f"--num-directions must be an integer in [1, {ops.MAX_DIRECTIONS_PER_PASS - 1}]")
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
        cfg.batch_size = 32
    if cfg.batch_size is not None and not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
        raise ConfigError(f"--batch-size must be a positive integer, got {cfg.batch_size!r}")
    for name in ("steps", "max_length", "eval_batch_size", "log_every", "save_every"):
        v = getattr(cfg, name)
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
    return cfg


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
    a(
        "--trainable",
        help=f"which parameters train: all, head, last:N, bias, layernorm, re:<regex>; comma-joined [{d.trainable}]",
    )
    a("--max-length", type=int, help=f"tokens per example [{d.max_length}]")
    a("--dtype", help=f"parameter dtype: {', '.join(DTYPES)} [{d.dtype}]")
    a("--device", help="cpu, cuda, or auto [auto]")
    a("--backend", help=f"kernel backend: {', '.join(ops.BACKENDS)} [{d.backend}]")
    a("--method", help=f"{', '.join(METHODS)} [{d.method}]")
    a("--num-directions", "-K", type=int, help="K directions per step [4; 1 for dpzero]")
    a("--difference", help=f"central (2K forwards) or forward (K+1 forwards) [{d.difference}]")
    a("--direction-kind", help=f"gaussian or rademacher directions [{d.direction_kind}]")
    a("--zo-eps", type=float, help=f"perturbation scale lambda [{d.zo_eps}]")
    a("--lr", type=float, help=f"learning rate [{d.lr}]")
    a("--rounding", help="update rounding: auto (stochastic for bf16), nearest, stochastic [auto]")
    a("--epsilon", type=float, help=f"target epsilon [{d.epsilon}]")
    a("--delta", type=float, help=f"target delta [{d.delta}]")
    a("--clip", type=float, help=f"clipping threshold C on the per-example K-vector scaled by 1/K [{d.clip}]")
    a("--sample-rate", type=float, help="Poisson sampling rate q (instead of --batch-size)")
    a("--batch-size", type=int, help="expected batch size q*n [32]")
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
