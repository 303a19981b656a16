"""Everything a run needs before its first step, and what it does after the last.

``build_model`` is shared with ``replay``: the same public seed, model, trainable
subset and dtype give the same starting buffers, which the ledger header fingerprints.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import privacy
from ..core.allocator import keep_freed_memory
from ..core.errors import ConfigError, TrainingDiverged
from ..core.flat import FlatParams
from ..data import get_task
from ..heads import build_head, count_at_length, resolve_head
from ..heads.evaluate import metric_sums
from ..models.adapters import Adapter, build_adapter
from ..models.loading import kind_of_config, load_model_and_tokenizer, max_positions, model_config, select_trainable
from ..models.prefix_cache import cached_prefix, frozen_prefix_length
from ..models.step_forward import GPU_BATCH_MULTIPLE, StepForward
from ..zo.engine import PassCounter
from ..zo.guard import rms
from ..zo.parallel import Comm, CommStats
from ..zo.private_zo import PrivateZO
from ..zo.rules import Released
from ..zo.step import StepRecord, check_stage_event
from . import preflight
from .config import FIRST_ORDER_METHODS, TrainConfig
from .distributed import from_root
from .ledger import Ledger, void_for_torn_row
from .model_card import label_model_config, write_model_card
from .reporting import TensorBoardLog
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


def load_task(cfg: TrainConfig):
    """The task's train / dev / test splits as ``cfg`` asks for them (the trainer's and ``evaluate``'s)."""
    return get_task(
        cfg.task, data_dir=cfg.data_dir, seed=cfg.seed if cfg.data_seed is None else cfg.data_seed, k_shot=cfg.k_shot,
        num_train=cfg.num_train, num_dev=cfg.num_dev, train_file=cfg.train_file, validation_file=cfg.validation_file,
        test_file=cfg.test_file, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
        label_column=cfg.label_column, template=cfg.template, label_words=cfg.label_words,
    )  # fmt: skip


@dataclass
class Built:
    """A run's model as ``build_model`` makes it. ``model`` is what the loss heads call; ``flat``
    covers the trainable parameters (with ``--peft``: the adapter's, ``adapter.peft_model``)."""

    model: nn.Module
    tokenizer: Any
    trainable: list[str]
    flat: FlatParams
    adapter: Adapter | None = None

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors a run saves in model/: the adapter's with ``--peft``, else the whole model's."""
        return self.adapter.state_dict() if self.adapter is not None else self.model.state_dict()


def build_model(cfg: TrainConfig, num_labels: int, head: str = "sequence-classification") -> Built:
    """Model, tokenizer, trainable names and flat buffer, deterministic in ``cfg.seed``.
    ``head`` is the resolved loss head: it picks the model class (an LM head for prompt heads)."""
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()  # the 2K forwards of a step reuse their buffers instead of faulting them in again
    torch.manual_seed(cfg.seed)  # public: a freshly initialised head (and adapter) is part of the base model
    dtype = getattr(torch, cfg.dtype)
    model, tokenizer = load_model_and_tokenizer(cfg.model, num_labels, dtype=dtype, device=device, head=head)
    model.eval()  # no dropout: L+ and L- must see the same function
    options = cfg.adapter_options()
    if options is None:
        trainable = select_trainable(model, cfg.trainable)
        return Built(model, tokenizer, trainable, FlatParams(model))
    adapter = build_adapter(model, options, head, zeroth_order=cfg.method not in FIRST_ORDER_METHODS)
    return Built(adapter.model, tokenizer, adapter.trainable_names(), FlatParams(adapter.peft_model), adapter)


@dataclass
class LossMeter:
    """Running means between log steps (local diagnostics: not differentially private).

    Losses are kept per step as (sum, count) over this rank's forwards, so that a job spread
    over ranks averages them over every forward of the step (``flush``'s ``reduce``); the
    clipping diagnostics are already the whole batch's on every rank."""

    losses: list[tuple[float, int]] = field(default_factory=list)
    clipped: list[float] = field(default_factory=list)
    clip_errors: list[float] = field(default_factory=list)
    nonfinite: int = 0
    empty_batches: int = 0

    def update(self, loss: float | None, released: Released, count: int = 1) -> None:
        """``loss``: the mean over ``count`` per-example losses here; None when no forward ran here."""
        if loss is None and released.batch_size == 0:
            self.empty_batches += 1
        else:
            self.losses.append((loss * count, count) if loss is not None and count else (0.0, 0))
            self.clipped.append(released.fraction_clipped)
            self.clip_errors.append(released.relative_clip_error)
        self.nonfinite += released.nonfinite_rows

    def flush(
        self, step: int, eps: float | None, counter: PassCounter, elapsed: float, numel: int, reduce=None
    ) -> dict:
        """The row of a log step. ``reduce`` sums a tensor over the ranks (forwards, loss sums)."""

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else float("nan")

        sums = torch.tensor([[float(counter.forwards), 0.0], *self.losses], dtype=torch.float64).reshape(-1, 2)
        if reduce is not None:
            sums = reduce(sums)
        per_step = [float(t / c) if c else float("nan") for t, c in sums[1:].tolist()]
        row = {
            "step": step,
            "loss": mean(per_step),
            "fraction_clipped": mean(self.clipped),
            "relative_clip_error": mean(self.clip_errors),
            "nonfinite_rows": self.nonfinite,
            "empty_batches": self.empty_batches,
            "epsilon": eps,
            "passes": counter.passes,
            "forwards": int(sums[0, 0]),
            "direction_values": counter.direction_values,
            # RNG work: direction values generated per trainable weight per step (4K - 1 central, 3K - 1 forward)
            "direction_values_per_weight_step": counter.direction_values / (numel * step) if step and numel else None,
            "elapsed_s": round(elapsed, 3),
        }
        self.__init__()
        return row


class Session:
    """A run's state: data, model, head, the privacy plan and the trainer (``PrivateZO`` for ZO methods).

    Made in two halves so that a job spread over ranks can agree on set-up errors before any
    collective: ``__init__`` does what is local to a rank (data, model, plan; rank 0 reads the
    ledger and the checkpoint), ``open`` what the ranks do together (check the replicas, resume
    or evaluate the untrained model, write the header). ``comm``: this rank's place (default: one
    rank). Rank 0 alone holds the secret generator and writes the output directory."""

    def __init__(self, cfg: TrainConfig, run: RunDir, resuming: bool, comm: Comm | None = None):
        """``resuming``: the run in ``run`` has begun releasing; continue it from its ledger."""
        self.cfg = cfg
        self.comm = comm if comm is not None else Comm()
        root = self.comm.is_root
        self.task = load_task(cfg)
        config = model_config(cfg.model)  # the model's config.json only: checks before its weights load
        self.head_name = resolve_head(cfg.head, self.task, kind_of_config(config))  # auto: task + model decide
        n = len(self.task.train)
        if cfg.sample_rate is None and cfg.batch_size > n and not cfg.count_share:
            raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {n} training examples")
        self.ledger: Ledger | None = run.state.ledger if resuming and root else None  # verified (integrity.py)
        self.max_length = cfg.max_length or self.task.max_length
        self._check_positions(config)
        built = build_model(cfg, self.task.num_labels, self.head_name)
        self.model, self.tokenizer, self.flat = built.model, built.tokenizer, built.flat
        self.trainable = built.trainable
        self.adapter = built.adapter  # --peft: the PEFT adapter (what the flat buffer covers and what is saved)
        self.device = self.flat.device
        # run once per step, not 2K times (never with prefix-tuning: its virtual tokens enter every block)
        self.cached_blocks = self.adapter.cached_blocks() if self.adapter else frozen_prefix_length(self.model)
        static = self.adapter.static_inputs if self.adapter else True  # prefix-tuning: the model's own inputs
        self.step_forward = StepForward(  # the step's 2K forwards: prepared once, bucketed, compiled (--compile)
            lambda batch: self.head.per_example_loss(self.model, batch),
            self.device,
            cfg.compile,
            cfg.batch_multiple,
            prepare=(lambda batch: self.head.prepare(self.model, batch)) if static else None,
            cuda_graphs=False if self.cached_blocks else None,  # a replay could overwrite the cached prefix
            model=self.model,
            read_positions=lambda batch: self.head.read_positions(self.model, batch),
        )
        extra = {"max_new_tokens": cfg.max_new_tokens} if self.head_name == "causal-generation" else {}
        if self.step_forward.cuda_graphs:  # one recording per shape: lengths in steps of 8 as well
            extra["pad_to_multiple_of"] = GPU_BATCH_MULTIPLE
        self.head = build_head(self.head_name, self.task, **extra)
        if root:
            self._note_truncation()
        self.plan = self._plan(run, n)
        if root:
            self._check_against_ledger()
            for line in self.plan.notes:
                print(f"note: {line}", file=sys.stderr)
        self.sample_rate = self.plan.sample_rate
        self.sigma, self.accountant, self.sampler = self.plan.noise_multiplier, self.plan.accountant, self.plan.sampler
        self.engine = self._build_engine()  # refuses a λ whose restore would lose the weights (zo.guard)
        self.loss_meter = LossMeter()
        self.start_step = 0
        self.logged_stages: set[int] = set()  # stage rows already in the ledger (a resume re-enters their stage)
        self._checkpoint: dict | None = None  # rank 0's checkpoint state, checked before any edit (a resume)
        if root:
            self._checkpoint = self._load_resume_state(run) if resuming else None
            done = self.ledger.last_step if resuming else 0
            run.check_free_space(self._space_needed(cfg.steps - done))
        self._comm_mark, self._wall_mark = CommStats(), 0.0  # collectives counted from the last log step

    def _plan(self, run: RunDir, n: int) -> privacy.PrivacyPlan:
        """The privacy plan; rank 0 alone holds the secret generator (and calibrates σ, and accounts)."""
        cfg = self.cfg
        if not self.comm.is_root:
            q = cfg.sample_rate if cfg.sample_rate is not None else min(1.0, cfg.batch_size / n)
            return privacy.PrivacyPlan.replica(cfg.private, n, q)  # rank 0's facts arrive in ``open``
        return privacy.PrivacyPlan.create(
            n,
            steps=cfg.steps,
            sample_rate=cfg.sample_rate,
            batch_size=cfg.batch_size if cfg.sample_rate is None else None,
            epsilon=cfg.epsilon if cfg.private else None,
            delta=cfg.delta,
            count_share=cfg.count_share,
            update_every=cfg.log_every,  # exact ε at log steps; in between the next log step's bound
            generator=self._secret_generator(run),
            **self._fixed_by_ledger(),
        )

    def open(self, run: RunDir, resuming: bool) -> None:
        """What the ranks do together before the first step: the same starting weights everywhere,
        rank 0's public privacy facts, then resume from rank 0's ledger and checkpoint, or commit the
        fresh run (rank 0: key, header, metrics, config.json) and evaluate the untrained model."""
        comm = self.comm
        comm.check_replicas(0, self.model.state_dict().values(), what="starting weights (--model, --seed)")
        facts = from_root(comm, self.plan.public_facts() if comm.is_root else None)
        if not comm.is_root:
            self.plan.adopt(facts)
            self.sample_rate = self.plan.sample_rate
        if resuming:
            self._resume(run)
        elif comm.is_root:
            if not self.plan.reproducible:
                run.save_secret(self.plan.generator)  # before the first release (the header's count)
            run.start(self.cfg, self._ledger_header())  # header, metrics, then config.json: the run exists
        self.tensorboard = self._attach_tensorboard(run, resuming) if comm.is_root else None
        if not resuming:
            self.untrained = self.evaluate("test", "eval test (untrained)")
            run.log_metrics({"step": 0, "split": "test", **self.untrained})
        self._comm_mark = CommStats(**vars(comm.stats))  # set-up collectives are not the steps'

    def _check_positions(self, config) -> None:
        """--max-length (plus the decoded answer, for generation) fits the model's positions, found from its
        config before the weights load, not as an index error at the first step. A task's default length
        is capped at the model's (with a note); a length the user asked for is refused."""
        limit = max_positions(config)
        extra = self.cfg.max_new_tokens if self.head_name == "causal-generation" else 0
        if limit is None or self.max_length + extra <= limit:
            return
        what = f"--max-length {self.max_length}" + (f" + --max-new-tokens {extra}" if extra else "")
        if self.cfg.max_length is not None or limit - extra < 1:
            raise ConfigError(f"{what} exceeds the {limit} positions of model {self.cfg.model}")
        if self.comm.is_root:
            print(
                f"note: {what} (the task's default) exceeds the model's {limit} positions; using --max-length "
                f"{limit - extra}",
                file=sys.stderr,
            )
        self.max_length = limit - extra

    def _space_needed(self, steps_left: int) -> dict[str, int]:
        """What the rest of the run writes (preflight.estimate_bytes), from the loaded model's sizes."""
        model_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        zo = getattr(self, "zo", None)  # first-order runs keep no checkpoints and write no directions
        checkpoint_bytes = sum(b.numel() * b.element_size() for b in self.flat.buffers) if zo is not None else 0
        k = self.cfg.num_directions if zo is not None else 0
        return preflight.estimate_bytes(model_bytes, checkpoint_bytes, steps_left, k, self.cfg.log_every)

    def _attach_tensorboard(self, run: RunDir, resuming: bool) -> TensorBoardLog | None:
        """--report-to tensorboard: each metrics row also goes to run/tensorboard; a resume rebuilds the events
        from the metrics rows it kept (verified by integrity.py before any edit), so they match metrics.jsonl."""
        if self.cfg.report_to != "tensorboard":
            return None
        path = run.path / "tensorboard"
        log = TensorBoardLog.resumed(path, self.kept_metrics) if resuming else TensorBoardLog(path)
        run.metric_sinks.append(log)
        return log

    def _secret_generator(self, run: RunDir) -> privacy.SecretGenerator:
        """The run's key: a debug seed's, the one the run saved (a resume), or a fresh one."""
        if self.cfg.noise_seed is not None:
            return privacy.SecretGenerator.from_debug_seed(self.cfg.noise_seed)
        if self.cfg.resume and run.secret_path.exists():
            return privacy.SecretGenerator.load(run.secret_path)
        if self.ledger is not None and self.ledger.header is not None:
            print(
                f"note: {run.secret_path} is missing: the run continues with a new secret key (still private, "
                "but no longer reproducible from its start)",
                file=sys.stderr,
            )
        return privacy.secret_generator()

    def _fixed_by_ledger(self) -> dict:
        """What a resumed run takes from its ledger header instead of drawing or calibrating again."""
        if self.ledger is None or not self.cfg.private:
            return {}
        h = self.ledger.header
        return {"noise_multiplier": h["noise_multiplier"], "released_count": h.get("released_count")}

    def _check_against_ledger(self) -> None:
        if self.ledger is None:
            return
        h = self.ledger.header
        if h.get("sample_rate") != self.plan.sample_rate:
            raise ConfigError(
                f"--resume: the ledger's sampling rate {h.get('sample_rate')} differs from this run's "
                f"{self.plan.sample_rate}: the data or the config changed"
            )

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
        cfg = self.cfg
        self.zo = PrivateZO(self.model, self.plan, cfg.zo_options(), cfg.steps, flat=self.flat, comm=self.comm)
        self.stages = self.zo.stages  # DP-ZOSO schedule, DP-ZOPO mask
        engine = self.zo.engine
        if engine.cache_nbytes and self.comm.is_root:
            weights = sum(b.numel() for b in self.flat.buffers)
            print(f"direction cache: {engine.cache_nbytes / 1e6:.1f} MB over {engine.cache_nbytes // 4:,} of "
                  f"{weights:,} trained weights", file=sys.stderr)  # fmt: skip
        return engine

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
            "adapter": self.adapter.describe() if self.adapter else None,
            "initial_sha256": fingerprint(self.flat),
        }

    def log_release(self, run: RunDir, rec: StepRecord, eps: float | None) -> None:
        """Append a step's public rows to the ledger: the stage it opens (unless a resume found it
        there already), then the release. Rank 0 alone writes the ledger."""
        if not self.comm.is_root:
            return
        if rec.stage_row is not None:
            if rec.stage_row["step"] in self.logged_stages:
                check_stage_event(rec.stage_row, self.ledger.stages.get(rec.stage_row["step"]))
            else:
                run.log_ledger(rec.stage_row)
        run.log_ledger(rec.ledger_row(eps))

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
        return None if batch is None else self.step_forward.bind(batch)

    def forwards(self):
        """What wraps a step's forwards: the frozen bottom blocks run once, not 2K times (exact)."""
        return cached_prefix(self.model, self.cached_blocks)

    def evaluate(self, split: str, progress: str | None = None) -> dict:
        """The head's metrics on ``split`` (capped at --max-eval-examples), with a progress bar (rank 0's):
        each rank evaluates its part of the examples, the sums are reduced."""
        examples = getattr(self.task, split)
        if self.cfg.max_eval_examples is not None:
            examples = examples[: self.cfg.max_eval_examples]
        part = (self.comm.layout.rank, self.comm.world_size)
        with torch.no_grad():
            sums, n = metric_sums(
                self.model, self.head, examples, self.tokenizer, self.cfg.eval_batch_size, self.max_length, part,
                progress=(progress or f"eval {split}") if self.comm.is_root else None,
            )  # fmt: skip
        totals = self.comm.all_reduce(torch.tensor([*sums.values(), n], dtype=torch.float64)).tolist()
        n = int(totals[-1])
        return {**{name: (t / n if n else float("nan")) for name, t in zip(sums, totals)}, "n": n}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, run: RunDir, step: int) -> None:
        """Every rank calls it; rank 0 writes (the forwards counted are the whole job's)."""
        zo_state = self.zo.state_dict()
        passes, forwards, values = zo_state["counter"]
        zo_state["counter"] = (passes, int(self.comm.all_reduce(torch.tensor([float(forwards)]))[0]), values)
        if not self.comm.is_root:
            return
        state = {
            "step": step,
            "buffers": [b.detach().cpu().clone() for b in self.flat.buffers],
            "zo": zo_state,
            "untrained": self.untrained,
        }
        run.save_checkpoint(step, state)

    def _check_base_model(self, run: RunDir) -> None:
        """The freshly loaded weights are the ones the ledger's run started from."""
        if fingerprint(self.flat) != run.state.header.get("initial_sha256"):
            raise ConfigError(
                f"--resume: the model's starting weights differ from those {run.ledger_path} was made from "
                "(initial_sha256): the model files changed since the run started"
            )

    def _load_resume_state(self, run: RunDir) -> dict | None:
        """The checkpoint's state, checked against this session's buffers; None without a checkpoint."""
        self._check_base_model(run)
        if run.state.checkpoint is None:
            return None
        state, _ = run.load_checkpoint()
        path = run.state.checkpoint.path / "state.pt"
        try:
            buffers, step = state["buffers"], int(state["step"])
            shapes_match = len(buffers) == len(self.flat.buffers) and all(
                b.shape == f.shape and b.dtype == f.dtype for b, f in zip(buffers, self.flat.buffers)
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"{path} does not hold a training state: the checkpoint is damaged") from None
        if not shapes_match:
            raise ConfigError(f"{path} holds parameter buffers of other shapes than this model's trainable ones")
        if step != run.state.checkpoint.step:
            raise ConfigError(f"{path} holds step {step}, its manifest says {run.state.checkpoint.step}")
        return state

    def _resume(self, run: RunDir) -> None:
        """Continue from the ledger: the last checkpoint (or the base model), then every released
        step past it re-applied from its ledger row (no data, no forward), then new steps at the
        next secret address. Nothing released is ever computed again. The directory is edited only
        once all of it has succeeded in memory on every rank (``run.continue_from``).

        Rank 0 reads the ledger and the checkpoint and broadcasts what is public (the rows, the
        parameters, the step); the secret key stays on rank 0. So a run resumes on any number of ranks."""
        comm, state = self.comm, self._checkpoint
        void = None
        if comm.is_root:
            if state is not None:
                self.flat.load_buffers([b.to(self.device) for b in state["buffers"]])
            void = void_for_torn_row(self.ledger)  # a row cut by the kill after it began to release: counted
        public = from_root(comm, self._public_resume_state(run) if comm.is_root else None)
        comm.broadcast_(self.flat.buffers)
        if public["zo"] is not None:
            self.zo.load_state_dict(public["zo"])
            if not comm.is_root:
                self.engine.counter.forwards = 0  # rank 0's counter holds the job's forwards so far
        untrained = public["untrained"]
        self.untrained = untrained if untrained is not None else self.evaluate("test", "eval test (untrained)")
        replayed = self.zo.resume(public["steps"], public["stages"], public["releases"])
        self.logged_stages = set(public["stages"])
        self.start_step = self.zo.steps_done
        self._checkpoint = None
        comm.check_replicas(self.start_step, self.flat.buffers, what="resumed parameters")
        if not comm.is_root:
            return
        metrics = run.state.metrics.rows
        keep = next((i for i, row in enumerate(metrics) if row["step"] > self.start_step), len(metrics))
        run.continue_from(keep, [void] if void is not None else [])  # the first edit of the directory
        self.kept_metrics = metrics[:keep]  # metrics.jsonl's rows from here on (TensorBoard is rebuilt from them)
        if void is not None:
            print(f"note: the ledger's last row (step {void['step']}) was cut by the kill: {void['reason']}",
                  file=sys.stderr)  # fmt: skip
        start = f"checkpoint at step {state['step']}" if state else "no checkpoint: from the base model"
        print(
            f"resuming {run.path} at step {self.start_step}: {replayed} released steps re-applied from the ledger "
            f"({start})",
            file=sys.stderr,
        )

    def _public_resume_state(self, run: RunDir) -> dict:
        """What every rank needs to resume (rank 0 reads it): public rows and state, no secret."""
        state, ledger = self._checkpoint, self.ledger
        return {
            "zo": state["zo"] if state is not None else None,
            "untrained": state["untrained"] if state is not None else self._untrained_from_metrics(run),
            "steps": ledger.steps,
            "stages": ledger.stages,
            "releases": ledger.releases,
        }

    def _untrained_from_metrics(self, run: RunDir) -> dict | None:
        """The base model's test scores, as logged before step 1 (None if that line is gone: evaluate again)."""
        for row in run.state.metrics.rows:
            if row.get("step") == 0 and row.get("split") == "test":
                return {k: v for k, v in row.items() if k not in ("step", "split")}
        return None

    # ------------------------------------------------------------------ finish
    def finalize(self, run: RunDir, elapsed: float) -> dict:
        """Every rank evaluates its part; rank 0 writes the model, its card and the summary."""
        if not math.isfinite(rms(self.flat)):  # the last line of defence: never save a non-finite model
            raise TrainingDiverged("the trained weights are not finite; the model was not saved")
        final = self.evaluate("test")
        run.log_metrics({"step": self.cfg.steps, "split": "test", **final})
        forwards = int(self.comm.all_reduce(torch.tensor([float(self.engine.counter.forwards)]))[0])
        if not self.comm.is_root:
            return {}
        label_model_config(self.model.config, self.task, self.head)
        record = self.privacy_record(run)
        saved = self.save(run, record, final)
        summary = {
            "method": self.cfg.method,
            "steps": self.cfg.steps,
            "head": self.head_name,
            "max_length": self.max_length,
            "metric": self.head.primary_metric,
            "untrained_test": self.untrained,
            "final_test": final,
            "private": record["private"],
            "privacy": record["privacy"],
            "epsilon_target": self.cfg.epsilon if self.plan.guaranteed else None,
            "epsilon_spent": record["epsilon"],
            "delta": self.cfg.delta if self.plan.guaranteed else None,
            "noise_multiplier": self.sigma,
            "sample_rate": self.sample_rate,
            "sample_rate_source": self.plan.sample_rate_source,
            "released_count": self.plan.released_count,
            "releases": self.plan.releases,
            "passes": self.engine.counter.passes,
            "forwards": forwards,
            "direction_values_per_weight_step": self.engine.counter.direction_values
            / (self.flat.numel * self.cfg.steps),
            **self._forward_summary(),
            "train_seconds": round(elapsed, 2),
            "output_dir": str(run.path),
            "saved": saved,
            "layout": self.comm.layout.describe(),
            **self._comm_totals(),
            **self.stages.summary(),
        }
        run.write_summary(summary)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary

    def privacy_record(self, run: RunDir) -> dict:
        """privacy.json: the guarantee the saved model carries (``privacy.record``)."""
        return privacy.privacy_record(
            self.plan,
            method=self.cfg.method,
            mechanism=self._mechanism_facts(),
            dataset_size=None if self.plan.released_count is not None else len(self.task.train),
            ledger_path=run.ledger_path,
        )

    def _mechanism_facts(self) -> dict:
        o = self.zo.options
        facts = {"num_directions": o.num_directions, "clip": o.clip, "clip_mode": o.clip_mode}
        if o.private:
            facts["noise"] = self.zo.rule.mechanism.describe()
        return facts

    def save(self, run: RunDir, record: dict, final: dict) -> dict:
        """The final model, each directory written whole and replaced atomically with its SHA256SUMS
        (``RunDir.save_model``): the adapter alone with ``--peft`` (``save_pretrained``; ``--merge-adapter``
        adds the merged plain model in model-merged/), else the whole model. Returns what went where, and
        its size."""
        adapter = self.adapter.describe() if self.adapter is not None else None

        def write(directory: Path) -> None:
            if self.adapter is None:
                save_model(self.model, self.tokenizer, directory)
            else:
                self.adapter.save(directory, self.tokenizer)
            write_model_card(directory, self.cfg, self.task, self.head, record, final, adapter=adapter)

        run.save_model(write)
        key = "model" if self.adapter is None else "adapter"
        saved = {key: str(run.model_dir), "weights_bytes": weights_bytes(run.model_dir)}
        if self.cfg.merge_adapter:  # last: merging consumes the adapter

            def write_merged(directory: Path) -> None:
                save_model(self.adapter.merged(), self.tokenizer, directory)
                write_model_card(directory, self.cfg, self.task, self.head, record, final)

            run.save_model(write_merged, run.merged_dir)
            saved.update(merged=str(run.merged_dir), merged_weights_bytes=weights_bytes(run.merged_dir))
        return saved

    def log_progress(self, run: RunDir, bar, done: int, eps: float | None, elapsed: float) -> dict:
        """Flush the running means into metrics.jsonl and the progress bar (loss, ε, fraction clipped);
        on several ranks also the layout, the bytes sent per step and the time spent in collectives."""
        steps = len(self.loss_meter.losses) + self.loss_meter.empty_batches
        flushed = self.loss_meter.flush(done, eps, self.engine.counter, elapsed, self.flat.numel, self.comm.all_reduce)
        row = self._metrics_row(flushed)
        row.update(self._comm_row(steps, elapsed))
        run.log_metrics(row)
        bar.set_postfix(
            loss=f"{row['loss']:.4f}",
            eps=f"{eps:.3f}" if eps is not None else "-",
            clipped=f"{row['fraction_clipped']:.2f}",
        )
        return row

    def _metrics_row(self, row: dict) -> dict:
        return row | self._forward_summary()

    def _forward_summary(self) -> dict:
        """How the forwards ran: compiled or not, seconds in first calls (compilation), rows padded."""
        f = self.step_forward
        if not f.stats.forwards:  # first-order runs (and all-empty batches) do not use it
            return {}
        return {
            "compiled_forward": f.compiled,
            "forward_first_call_s": round(f.stats.first_call_s, 2),
            "padded_rows": f.stats.padded_rows,
        }

    def _comm_row(self, steps: int, elapsed: float) -> dict:
        """Collectives since the last log step (rank 0's view): bytes per step, seconds, share of the wall time."""
        if self.comm.world_size == 1:
            return {}
        spent = self.comm.stats.minus(self._comm_mark)
        wall = elapsed - self._wall_mark
        self._comm_mark, self._wall_mark = CommStats(**vars(self.comm.stats)), elapsed
        return {
            "layout": self.comm.layout.describe(),
            "comm_bytes_per_step": round(spent.bytes / max(steps, 1)),
            "comm_calls_per_step": round(spent.calls / max(steps, 1), 2),
            "comm_seconds": round(spent.seconds, 4),
            "comm_share": round(spent.seconds / wall, 4) if wall > 0 else None,
        }

    def _comm_totals(self) -> dict:
        stats = self.comm.stats
        return {"comm_bytes": stats.bytes, "comm_seconds": round(stats.seconds, 3)} if self.comm.world_size > 1 else {}

    def print_summary(self, summary: dict) -> None:
        metric = summary.get("metric", "accuracy")
        u, f = summary["untrained_test"][metric], summary["final_test"][metric]
        eps = summary["epsilon_spent"]
        privacy_line = (
            f"epsilon spent {eps:.3f} (target {summary['epsilon_target']}, delta {summary['delta']:g})"
            if eps is not None
            else f"NOT private: {summary['privacy'].removeprefix('not private: ')} (no epsilon)"
        )
        saved = summary.get("saved") or {}
        model = "model/"
        if "adapter" in saved:
            model = f"model/ = the {self.cfg.peft} adapter, {saved['weights_bytes'] / 1e3:.0f} kB of weights"
            model += ", model-merged/" if "merged" in saved else ""
        files = f"{model}, metrics.jsonl, ledger.jsonl, summary.json" + (", tensorboard/" if self.tensorboard else "")
        print(
            f"\ntest {metric.replace('_', ' ')}: untrained {u:.4f} -> fine-tuned {f:.4f}\n{privacy_line}\n"
            f"outputs: {summary['output_dir']} ({files})"
        )


def weights_bytes(path) -> int:
    """Bytes of the safetensors files in ``path``: the weights a user copies (the tokenizer aside)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def save_model(model: nn.Module, tokenizer, path) -> None:
    """save_pretrained with independent copies: parameters are views of one flat buffer,
    which safetensors would otherwise see as shared storage."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(path, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
