"""``PrivateZO``: DP zeroth-order training of any model with a per-example loss, from Python.

The CLI trainer is one user of this class; yours can be a few lines::

    zo = PrivateZO.make(model, num_examples=len(X), steps=200, batch_size=64,
                        epsilon=2.0, delta=1e-5, num_directions=16, clip=1.0, lr=0.05)
    def loss(xb, yb):                         # one loss per example, at the current parameters
        return F.cross_entropy(model(xb), yb, reduction="none")

    for idx in zo.batches():                  # secret Poisson batches of example indices (some empty)
        zo.step(loss, X[idx], y[idx])         # K directions: clip, noise, fused update; accounted
    print(zo.epsilon())

Rules the class enforces, because breaking them silently would break the guarantee or the math:
each private step releases the batch that ``sample()`` (or ``batches()``) drew from the secret
generator, exactly once; the loss function returns one loss per example of that batch (shape
[B]; it is not called for an empty batch, whose release is pure noise); the model stays in eval
mode (dropout would let the two forwards of a difference see different functions). What trains
is what has ``requires_grad=True`` when the object is made: freeze the rest first.

What it holds, each part replaceable and documented where it lives: the flat buffer of the
trainable parameters (``core.flat``), the fused perturbation passes (``zo.engine``), the release
rule (``zo.rules``: clip, secret noise, / q·n), the stage schedule and mask (``zo.stagewise``), and
the privacy plan (``privacy.plan``: secret generator, Poisson sampler, σ, accountant).

Releases are made once. Release r (0-based) draws its batch and noise at address r of the secret
generator; ``resume`` re-applies released steps from their public ledger rows (``replay_step``: no
data, no forward) and continues at the number of releases the ledger holds, so a released value
is never recomputed, whatever the forward pass would give today.

Spread over ranks (``comm``: a ``zo.parallel.Comm``), rank 0 alone holds the plan's secret
generator: ``sample`` draws there and hands each rank its share of the batch, and the release
comes from there. The other ranks hold ``PrivacyPlan.replica`` (no secret, no ε).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ops
from ..core import stream
from ..core.errors import ConfigError
from ..core.flat import FlatParams
from ..privacy import GaussianMechanism
from ..privacy.plan import PrivacyPlan
from .engine import DIFFERENCES, ZOEngine
from .guard import DEFAULT_MAX_GROWTH, DivergenceGuard, check_perturbation_scale
from .parallel import Comm
from .rules import MeZORule, PrivateRule
from .stagewise import StageOptions, build_stagewise
from .step import LossFn, StepRecord, ZOStep, check_stage_event, replay_step

ZO_METHODS = ("dp-aggzo", "dpzero", "dp-aggzo-perdir", "dp-zoso", "dp-zopo", "mezo")
STAGEWISE_METHODS = ("dp-zoso", "dp-zopo")  # DP-AggZO's rule + a stage schedule (DP-ZOPO: + a mask)
# Defaults that depend on the method, read by the CLI too (run/config.py): an option left unset means the same
# from Python as on the command line.
DEFAULT_DIRECTIONS = {"dp-aggzo": 64, "dp-aggzo-perdir": 64}  # the papers' settings; the other methods: 1
DEFAULT_ZO_LR = 5e-2  # tuned for the embedded default task
DEFAULT_STAGES = 3  # DP-ZOSO / DP-ZOPO


def default_directions(method: str) -> int:
    return DEFAULT_DIRECTIONS.get(method, 1)


def default_clip_mode(method: str) -> str:
    """Joint clipping of the K-vector, except for the per-direction ablation (sensitivity C·√K)."""
    return "per_direction" if method == "dp-aggzo-perdir" else "joint"


@dataclass(frozen=True)
class ZOOptions:
    """How a step estimates and updates, as plain values (the CLI's config maps onto these).
    ``None`` fields take the method's default (``__post_init__``), as the CLI's flags do."""

    method: str = "dp-aggzo"
    num_directions: int | None = None  # default_directions(method)
    lr: float | None = None  # DEFAULT_ZO_LR
    zo_eps: float = 1e-3
    clip: float = 1.0
    clip_mode: str | None = None  # default_clip_mode(method)
    difference: str = "central"
    direction_kind: str = "gaussian"
    rounding: str = "auto"  # auto: stochastic for 16-bit buffers (updates below half an ulp would vanish), else nearest
    backend: str = "auto"
    seed: int = 0  # the public master seed of the direction stream
    stages: StageOptions | None = field(default=None)  # DP-ZOSO / DP-ZOPO attachments
    max_weight_growth: float = DEFAULT_MAX_GROWTH  # divergence band on rms θ (guard.py); 0: finiteness only
    direction_cache_gb: float = 0.0  # memory for the direction cache (engine.py): speed on the CPU, same bits

    def __post_init__(self) -> None:
        if self.method not in ZO_METHODS:
            raise ConfigError(f"method must be one of {', '.join(ZO_METHODS)}; got {self.method!r}")
        resolved = {
            "num_directions": default_directions(self.method),
            "lr": DEFAULT_ZO_LR,
            "clip_mode": default_clip_mode(self.method),
        }
        for name, default in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)  # frozen: filled once, here
        self._check()

    def _check(self) -> None:
        """Every field under its own name, when the run is made (the CLI checks its flags before this)."""
        k, most = self.num_directions, ops.MAX_DIRECTIONS_PER_PASS - 1
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most:
            raise ConfigError(f"num_directions must be an integer in [1, {most}], got {k!r}")
        if self.method == "dpzero" and k != 1:
            raise ConfigError("method dpzero uses one direction per step; leave num_directions unset or set it to 1")
        for name in ("lr", "zo_eps", "clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
        choices = {
            "clip_mode": ("joint", "per_direction"),
            "difference": DIFFERENCES,
            "direction_kind": stream.KINDS,
            "rounding": ("auto", *ops.ROUNDINGS),
            "backend": ops.BACKENDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        g = self.max_weight_growth
        if isinstance(g, bool) or not isinstance(g, int | float) or not (g == 0 or (math.isfinite(g) and g > 1)):
            raise ConfigError(f"max_weight_growth must be 0 (finiteness only) or a finite number > 1, got {g!r}")
        c = self.direction_cache_gb
        if isinstance(c, bool) or not isinstance(c, int | float) or not (math.isfinite(c) and c >= 0):
            raise ConfigError(f"direction_cache_gb must be a finite number >= 0, got {c!r}")
        if c > 0 and self.direction_kind != "gaussian":
            raise ConfigError("direction_cache_gb serves Gaussian directions; Rademacher signs cost less to generate")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    def stage_options(self, steps: int) -> StageOptions:
        """The stage schedule when ``stages`` is not given: DP-ZOSO's and DP-ZOPO's defaults, else none."""
        if self.stages is not None:
            return self.stages
        staged = self.method in STAGEWISE_METHODS
        return StageOptions(
            steps, self.lr, self.zo_eps, self.seed, self.direction_kind, self.rounding,
            stages=DEFAULT_STAGES if staged else None, mask=self.method == "dp-zopo",
        )  # fmt: skip

    def perturbation_scales(self) -> dict[str, float]:
        """Every λ the run will use, by the flag that sets it (DP-ZOSO's schedule is geometric between its ends)."""
        scales = {"--zo-eps": self.zo_eps}
        if self.stages is not None:
            for name in ("zo_scale_start", "zo_scale_end"):
                value = getattr(self.stages, name)
                if value is not None:
                    scales["--" + name.replace("_", "-")] = value
        return scales

    @property
    def private(self) -> bool:
        return self.method != "mezo"


ZO_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ZOOptions))


class PrivateZO:
    """Sample, step, account: one object per run (see the module docstring for the loop)."""

    def __init__(
        self,
        model: nn.Module,
        plan: PrivacyPlan,
        options: ZOOptions,
        steps: int,
        flat: FlatParams | None = None,
        comm: Comm | None = None,
    ):
        """``flat``: the model's flat buffer if one was already made (parameters are views into it).
        ``comm``: this rank's place in a scale-out job (default: one rank)."""
        if options.private != plan.private:
            raise ConfigError(f"method {options.method} needs a {'private' if options.private else 'non-private'} plan")
        self.comm = comm if comm is not None else Comm()
        if self.comm.is_root != (plan.generator is not None):
            raise ConfigError("rank 0, and only rank 0, holds the secret generator (PrivacyPlan.replica elsewhere)")
        self.flat = flat if flat is not None else FlatParams(model)
        if options.rounding == "auto":
            half = any(b.dtype in (torch.bfloat16, torch.float16) for b in self.flat.buffers)
            options = dataclasses.replace(options, rounding="stochastic" if half else "nearest")
        self.model, self.plan, self.options, self.steps = model, plan, options, steps
        for name, zo_eps in options.perturbation_scales().items():
            check_perturbation_scale(self.flat, zo_eps, name)  # before anything perturbs θ
        self.guard = DivergenceGuard(self.flat, options.max_weight_growth)
        try:
            self.engine = ZOEngine(
                self.flat, options.direction_kind, options.backend, options.difference,
                cache_bytes=int(options.direction_cache_gb * 1e9),
            )  # fmt: skip
        except ValueError as exc:  # the cache on a backend without one
            raise ConfigError(f"direction_cache_gb: {exc}") from exc
        self.stages = build_stagewise(options.stage_options(steps), model, self.flat, self.engine)
        self.rule = self._rule()
        self._step = ZOStep(
            self.engine, self.rule, self.stages, options.seed, options.num_directions, options.rounding, self.comm
        )
        self.steps_done = 0
        self._batch: list[int] | None = None  # drawn by sample(), released by the next step()

    @classmethod
    def make(
        cls,
        model: nn.Module,
        *,
        num_examples: int,
        steps: int,
        batch_size: float | None = None,
        sample_rate: float | None = None,
        epsilon: float | None = 2.0,
        delta: float = 1e-5,
        noise_seed: int | None = None,
        **options,
    ) -> PrivateZO:
        """A run over ``num_examples`` examples: Poisson batches of expected size ``batch_size`` (or
        rate ``sample_rate``), σ calibrated for (ε, δ) over ``steps`` (a few seconds: the PRV
        accountant). Other keywords: ``ZOOptions`` (method, num_directions, lr, zo_eps, clip, ...).
        ``method="mezo"`` (non-private) ignores ε and δ. Puts ``model`` in eval mode."""
        if (batch_size is None) == (sample_rate is None):
            raise ConfigError("give batch_size or sample_rate, not both")
        if batch_size is not None and not 0 < batch_size <= num_examples:
            raise ConfigError(f"batch_size must be in (0, num_examples={num_examples}]; got {batch_size}")
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(ZOOptions)})
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r}; ZOOptions has {', '.join(ZO_OPTION_NAMES)}")
        model.eval()
        opts = ZOOptions(**options)
        if opts.private and epsilon is None:
            raise ConfigError(f"method {opts.method} is private: give epsilon, or method='mezo' to train without it")
        plan = PrivacyPlan.create(
            num_examples,
            steps=steps,
            sample_rate=sample_rate,
            batch_size=batch_size,
            epsilon=epsilon if opts.private else None,
            delta=delta,
            noise_seed=noise_seed,
        )
        return cls(model, plan, opts, steps)

    def _rule(self) -> MeZORule | PrivateRule:
        o = self.options
        if not o.private:
            return MeZORule()
        if self.plan.generator is None:
            return PrivateRule.replica(o.clip, o.clip_mode, backend=self.engine.backend)
        mech = GaussianMechanism(self.plan.noise_multiplier, o.clip, o.num_directions, o.clip_mode, self.plan.generator)
        return PrivateRule(mech, self.plan.normalizer, backend=self.engine.backend)

    # ------------------------------------------------------------------ the loop
    def sample(self) -> list[int]:
        """The next Poisson batch's example indices, from the secret generator (may be empty): this
        rank's share of them when the step is spread over ranks (rank 0 draws and broadcasts).
        The next ``step()`` releases it; a private run cannot draw another before that. Both draw at
        the address of the next release."""
        if self._batch is not None and self.options.private:
            raise ConfigError("sample() called again before step(): every Poisson batch drawn must be released")
        self.comm.step = self.steps_done + 1
        if self.comm.is_root:
            self.plan.sampler.seek(self.plan.releases)
        self._batch = self.comm.batch(self.plan.sampler.sample() if self.comm.is_root else None)
        return self._batch

    def batches(self) -> Iterator[list[int]]:
        """``sample()`` for each remaining step; call ``step()`` once per batch."""
        while self.steps_done < self.steps:
            before = self.steps_done
            yield self.sample()
            if self.steps_done == before:
                raise ConfigError("each batch from batches() needs exactly one step() before the next")

    def step(
        self, loss_fn: Callable[..., torch.Tensor] | None, *inputs: Any, forwards: AbstractContextManager | None = None
    ) -> StepRecord:
        """One release: estimate along K directions, clip, noise, update; counted by the accountant.

        ``loss_fn(*inputs)`` returns the per-example losses [B] of the batch ``sample()`` drew (this
        rank's share of it, spread over ranks), at the current parameters; it runs 2K times (K + 1
        with forward differences; 2K/R on one of R direction ranks), under ``torch.no_grad``, and not
        at all for an empty batch. ``forwards``: a context manager around the step's forwards (e.g.
        ``models.prefix_cache.cached_prefix``). Raises TrainingDiverged when θ leaves the guard's
        band (``zo.guard``): record nothing of that step."""
        batch = self._batch
        if batch is None and self.options.private:
            raise ConfigError(
                "step() needs a batch from sample() or batches(): a private step releases a Poisson batch"
            )
        if self.model.training:
            raise ConfigError("the model is in training mode: call model.eval() (dropout would make L+ and L- differ)")
        empty = batch is not None and not batch
        checked = None if empty or loss_fn is None else _checked(loss_fn, inputs, batch)
        self._batch = None
        if self._noise is not None:
            self._noise.seek(self.plan.releases)
        record = self._step(self.steps_done, checked, forwards)
        self.guard.check(self.steps_done + 1, record.coefs, record.zo_eps)  # TrainingDiverged: record nothing
        self.plan.accountant.step()
        self.steps_done += 1
        return record

    def resume(self, rows: list[dict], stage_rows: dict[int, dict], releases: int) -> int:
        """Re-apply the released steps ``rows`` (ledger rows past ``steps_done``) from their public values
        alone, check the data-free stage events they recompute against ``stage_rows`` (by step), and
        continue after ``releases`` releases (the ledger's step rows plus its void ones). Returns the
        number of steps replayed."""
        replayed = 0
        for row in rows:
            if row["step"] <= self.steps_done:
                continue
            if row["step"] != self.steps_done + 1:
                raise ConfigError(f"the ledger jumps from step {self.steps_done} to step {row['step']}")
            event = replay_step(self.engine, self.stages, row, self.options.rounding)
            if event is not None:
                check_stage_event(event, stage_rows.get(row["step"]))
            self.steps_done += 1
            replayed += 1
        self.plan.seek(releases)
        if self._noise is not None:
            self._noise.seek(releases)
        return replayed

    def epsilon(self) -> float | None:
        """ε spent so far (PRV upper bound); None for a run that is not private (MeZO, a debug seed)."""
        return self.plan.epsilon()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Public state to resume from (the parameters are the model's): step, accounting, schedule, and
        the options it was made with (``load_state_dict`` refuses a run made with others)."""
        counter = self.engine.counter
        return {
            "step": self.steps_done,
            "privacy": self.plan.state_dict(),
            "counter": (counter.passes, counter.forwards, counter.direction_values),
            "stagewise": self.stages.state_dict(),
            "options": self._identity(),
        }

    def _identity(self) -> dict:
        """The options a resumed run must share with the run that saved its state: all but the backend
        (every backend gives the same bits), the divergence band (bookkeeping) and the direction cache (same
        bits); stages resolved."""
        options = dataclasses.asdict(self.options)
        del options["backend"], options["max_weight_growth"], options["direction_cache_gb"]
        return options | {"stages": dataclasses.asdict(self.options.stage_options(self.steps))}

    def load_state_dict(self, state: dict) -> None:
        saved, mine = state.get("options"), self._identity()  # states saved before they held options: no check
        for key, value in (saved or {}).items():
            if mine.get(key) != value:
                raise ConfigError(
                    f"this state was saved with {key}={value!r}; this run has {key}={mine.get(key)!r}: "
                    "make the run with the options it was saved with"
                )
        self.steps_done = int(state["step"])
        self.plan.load_state_dict(state["privacy"])
        counts = (*state["counter"], 0)[:3]  # checkpoints from before direction values were counted hold two
        self.engine.counter.passes, self.engine.counter.forwards, self.engine.counter.direction_values = counts
        self.stages.load_state_dict(state["stagewise"])
        if self._noise is not None:
            self._noise.seek(self.plan.releases)

    def secret_state(self) -> dict:
        """SECRET (the key of the sampling and noise generator): store apart from public outputs, mode 600."""
        return self.plan.secret_state()

    def load_secret_state(self, state: dict) -> None:
        self.plan.load_secret_state(state)
        if self._noise is not None:
            self._noise.generator = self.plan.generator

    @property
    def _noise(self):
        """The Gaussian mechanism, where this rank holds it (rank 0 of a private run); else None."""
        return getattr(self.rule, "mechanism", None)

    def __repr__(self) -> str:
        o, plan = self.options, self.plan
        if plan.guaranteed:
            eps = plan.epsilon() if self.steps_done else 0.0
            privacy = f"σ={plan.noise_multiplier:.4g}, C={o.clip:g}, ε spent {eps:.4g}"
        else:
            privacy = plan.status()
        return (
            f"PrivateZO({o.method}, K={o.num_directions}, lr={o.lr:g}, λ={o.zo_eps:g}, "
            f"{self.flat.numel:,} trainable parameters, q={self.plan.sample_rate:.4g}, {privacy}, "
            f"step {self.steps_done}/{self.steps})"
        )

    def header(self) -> dict:
        """Public facts of the run for a ledger header."""
        o = self.options
        return {
            "method": o.method,
            "stream_version": stream.STREAM_VERSION,
            "backend": self.engine.backend,
            "direction_kind": o.direction_kind,
            "difference": o.difference,
            "rounding": o.rounding,
            "master_seed": o.seed,
            **self.plan.public_facts(),
            "noise": self._noise.describe() if self._noise is not None else None,
            "num_directions": o.num_directions,
            "clip": o.clip if o.private else None,
            "trainable_numel": self.flat.numel,
            "clip_mode": o.clip_mode if o.private else None,
            "layout": self.comm.layout.describe(),
            **self.stages.header(),
        }


def _checked(loss_fn: Callable[..., torch.Tensor], inputs: tuple, batch: list[int] | None) -> LossFn:
    """``loss_fn(*inputs)``, whose result must be one loss per example of ``batch`` (a mean would
    escape the per-example clipping)."""

    def losses() -> torch.Tensor:
        out = loss_fn(*inputs)
        want = (len(batch),) if batch is not None else None
        if not torch.is_tensor(out) or out.dim() != 1 or (want is not None and tuple(out.shape) != want):
            got = f"shape {list(out.shape)}" if torch.is_tensor(out) else type(out).__name__
            size = f" [{len(batch)}]" if batch is not None else ""
            raise ConfigError(f"the loss function must return one loss per example{size} (reduction='none'); got {got}")
        return out

    return losses
