"""The output directory of a run: its layout and the protocol that keeps it usable through anything.

Layout:

    .lock                    held (flock) by the one process writing the run; gone when it ends
    config.json              the resolved TrainConfig (written last at the start: its presence = a run)
    secret.key               SECRET: the key of the sampling and noise generator (mode 600 from creation)
    ledger.jsonl             line 1: header (public run facts, sha256 of config.json); then one line per
                             step: seeds, rounding seed, λ, lr, the released noisy K-vector, the exact fp32
                             update coefficients, ε so far; stage and void rows (ledger.py). Append-only:
                             a resume re-applies its rows, never recomputes them. Every line ends with a
                             checksum chain (journal.py)
    metrics.jsonl            one chained JSON line per log step, plus evaluations (local: computed from the data)
    checkpoint/LATEST        name of the newest complete checkpoint directory
    checkpoint/step-NNNNNNN/ state.pt (public state: parameter buffers, step, accountant),
                             manifest.json (step, size and sha256 of state.pt, the log lines it follows)
    model/                   save_pretrained (safetensors) + tokenizer + model card + privacy.json + SHA256SUMS;
                             with --peft the adapter alone (PEFT's format)
    model-merged/            --peft lora --merge-adapter: the adapter merged into a plain model (+ SHA256SUMS)
    summary.json             final accuracies, ε spent, timings (strict JSON: no NaN)
    tensorboard/             --report-to tensorboard: metrics rows as scalars (a resume rebuilds it from metrics)

Protocol (docs/run-directory.md says why each step is there):

1. ``check_output_dir`` before anything loads; ``acquire`` makes the directory and takes the lock.
2. ``check_start``: a fresh run refuses a directory that holds a run; a resume ``verify``-s everything
   (integrity.py) and changes nothing.
3. ``start`` commits a fresh run (after ``save_secret``): ledger header, empty metrics, then config.json,
   each atomic. ``continue_from`` commits a resume: removes leftovers, drops a cut last line (a void row
   takes its place when it had begun to release) and the metrics lines to be redone. Both call
   ``clean_up`` first: ``.tmp.*`` entries of interrupted writes and checkpoints ``LATEST`` does not name.
4. A checkpoint is written complete under ``checkpoint/.tmp.*``, renamed to ``step-N``, then ``LATEST``
   is replaced atomically, then the superseded checkpoints are removed. A kill between the last two
   leaves one the next start removes before anything else.
5. The model is written complete under ``.tmp.*`` and renamed to ``model/`` (and ``model-merged/``);
   summary.json comes last.
6. ``release`` (any exit) drops the lock; ``abandon`` (set-up failed before ``start``) also removes
   what ``acquire`` and ``save_secret`` created, so a refused run leaves nothing behind.

Delete ``secret.key`` before sharing a run: with it anyone can recompute the noise. The ledger, the
checkpoints and the model are post-processing of the DP releases; metrics.jsonl is not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.errors import RunDirError
from ..core.files import sha256_file
from . import integrity, journal, preflight
from .atomic import TMP_PREFIX, atomic_torch_save, atomic_write_text, fsync_path, remove, tmp_name
from .integrity import Checkpoint, RunState
from .ledger import read_ledger
from .lock import RunLock

LATEST = "LATEST"
MANIFEST = "manifest.json"
MODEL_SUMS = "SHA256SUMS"
OLD_TMP_NAMES = {  # temporary names of versions before this protocol
    f"{name}.tmp" for name in ("config.json", "ledger.jsonl", "metrics.jsonl", "summary.json", LATEST)
}


def read_jsonl(path: Path) -> list[dict]:
    """The checked rows of a chained JSONL log (a torn last line is left out); [] if it does not exist."""
    return journal.read(path).rows if path.exists() else []


def strict_json(obj: Any, **kw) -> str:
    """JSON with NaN and infinities written as null: every file of a run parses with any JSON reader."""
    return json.dumps(journal.finite_or_none(obj), allow_nan=False, **kw)


class RunDir:
    """Paths, lock, checks and atomic I/O of one run's output directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.ledger_path = self.path / "ledger.jsonl"
        self.checkpoint_dir = self.path / "checkpoint"
        self.model_dir = self.path / "model"
        self.merged_dir = self.path / "model-merged"
        self.summary_path = self.path / "summary.json"
        self.secret_path = self.path / "secret.key"
        self.lock = RunLock(self.path)
        self.state: RunState | None = None  # the verified directory, on a resume
        self._created: list[Path] = []  # directories ``acquire`` made (``abandon`` removes them)
        self._committed = False
        self._wrote_secret = False
        self._chains = {self.ledger_path: "", self.metrics_path: ""}
        self._lines = {self.ledger_path: 0, self.metrics_path: 0}
        self.metric_sinks: list[Callable[[dict], None]] = []  # e.g. TensorBoard: each metrics row goes there too

    @property
    def committed(self) -> bool:
        """Whether this process has written the run (``start`` or ``continue_from``)."""
        return self._committed

    # ------------------------------------------------------------------ set-up
    def check_output_dir(self, resume: bool) -> None:
        """Before anything loads: a directory we can write, or one we can make (nothing is written)."""
        preflight.check_output_dir(self.path, resume)

    def acquire(self) -> None:
        """Make the directory (remembering what was made) and take the run's lock."""
        missing = []
        p = Path(os.path.abspath(self.path))
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create --output-dir {self.path}: {exc.strerror}") from None
        self._created = list(reversed(missing))
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    def abandon(self) -> None:
        """Set-up failed before ``start``: leave the directory as we found it (we hold the lock)."""
        if self._committed or not self.lock.held:
            return  # nothing written before ``start`` or ``continue_from`` but the lock, the directories, the key
        if self._wrote_secret:
            self.secret_path.unlink(missing_ok=True)  # a key for a run that never started
        self.lock.release()
        for d in reversed(self._created):
            try:
                d.rmdir()  # only if empty: never removes anything but what we made
            except OSError:
                break

    def check_start(self, cfg) -> bool:
        """A fresh run needs a directory without a run in it; a resume needs a run that verifies (so its
        ledger has begun: a header). Returns whether this is a resume. Writes nothing."""
        if not cfg.resume:
            if self.config_path.exists():
                raise RunDirError(
                    f"{self.path} already holds a run; pass --resume to continue it or pick another --output-dir"
                )
            foreign = [n for n in ("checkpoint", "model", "model-merged", "summary.json") if (self.path / n).exists()]
            if foreign:
                raise RunDirError(
                    f"{self.path} holds {foreign[0]} but no config.json: not a run this program can continue or "
                    "overwrite; pick an empty or new --output-dir"
                )
            return False
        self.state = integrity.verify(self)
        self._check_same_config(cfg)
        for path in (self.ledger_path, self.metrics_path, self.checkpoint_dir):
            if path.exists() and not os.access(path, os.W_OK):
                raise RunDirError(f"--resume: {path} is not writable")
        return True

    def _check_same_config(self, cfg) -> None:
        from .config import TrainConfig

        ours = cfg.identity()
        theirs = TrainConfig(**{**self.state.config, "resume": True}).identity()
        diff = sorted(k for k in ours if ours[k] != theirs.get(k))
        if diff:
            details = ", ".join(f"{k}: run has {theirs.get(k)!r}, now {ours[k]!r}" for k in diff)
            raise RunDirError(f"--resume: {self.path} was made with a different config ({details})")

    def check_free_space(self, need: dict[str, int]) -> None:
        preflight.check_free_space(self.path, need)

    def save_secret(self, generator) -> None:
        """The run's secret key (``generator.save``: mode 600 from creation), before the first release."""
        self.path.mkdir(parents=True, exist_ok=True)
        generator.save(self.secret_path)
        self._wrote_secret = not self._committed

    def start(self, cfg, header: dict) -> None:
        """Commit a fresh run: header, empty metrics, then config.json (its presence marks a run).
        A resume without a checkpoint starts over the same way, keeping its config.json."""
        self.path.mkdir(parents=True, exist_ok=True)  # made by ``acquire`` in the trainer; not for API users
        self.clean_up()
        config_text = self.config_path.read_text() if cfg.resume else cfg.to_json() + "\n"
        header = {**header, "config_sha256": integrity.config_digest(config_text)}
        self._rewrite(self.ledger_path, [header])
        self._rewrite(self.metrics_path, [])
        remove(self.summary_path)
        if not cfg.resume:
            atomic_write_text(self.config_path, config_text)
        self._committed = True

    def continue_from(self, metrics_lines: int, ledger_rows: list[dict] = ()) -> None:
        """Commit a resume (after every check passed): leftovers removed; the ledger keeps every complete
        line (append-only), a cut last line is dropped and ``ledger_rows`` (a void row) take its place in one
        atomic replacement; metrics keep their first ``metrics_lines`` lines (the rest are redone)."""
        state = self.state
        self.clean_up()
        for log, keep, then in (
            (state.ledger.journal, len(state.ledger.journal.rows), list(ledger_rows)),
            (state.metrics, metrics_lines, []),
        ):
            self._chains[log.path] = journal.keep_lines(log, keep, then)
            self._lines[log.path] = keep + len(then)
        remove(self.summary_path)
        self._committed = True

    def _rewrite(self, path: Path, rows: list[dict]) -> None:
        atomic_write_text(path, journal.write_lines(rows))
        self._chains[path] = journal.read(path).chain if rows else ""
        self._lines[path] = len(rows)

    def clean_up(self) -> None:
        """Remove what interrupted writes left: our ``.tmp.*`` entries here and in checkpoint/, the
        ``<file>.tmp`` of older versions, any ``.tmp*`` in model/ (save_pretrained's own), and any checkpoint
        that ``LATEST`` does not name. Nothing else: the directory may hold the user's files."""
        for d in (self.path, self.checkpoint_dir):
            if d.is_dir():
                for entry in d.iterdir():
                    if entry.name.startswith(TMP_PREFIX + ".") or entry.name in OLD_TMP_NAMES:
                        remove(entry)
        if self.model_dir.is_dir():
            for entry in self.model_dir.glob(TMP_PREFIX + "*"):
                remove(entry)
        latest = self.checkpoint_dir / LATEST
        keep = latest.read_text().strip() if latest.exists() else None
        if self.checkpoint_dir.is_dir():
            for entry in self.checkpoint_dir.glob("step-*"):
                if entry.name != keep:
                    remove(entry)

    # ------------------------------------------------------------------ logs
    def _append(self, path: Path, row: dict) -> None:
        self._chains[path] = journal.append(path, row, self._chains[path])
        self._lines[path] += 1

    def log_metrics(self, row: dict) -> None:
        self._append(self.metrics_path, row)
        mirrored = journal.finite_or_none(row)  # as the line reads back: NaN is null there
        for sink in self.metric_sinks:
            sink(mirrored)

    def log_ledger(self, row: dict) -> None:
        self._append(self.ledger_path, row)

    def ledger(self) -> tuple[dict, list[dict]]:
        """(header, step rows) of a checked ledger (replay's input; a cut last line is left out)."""
        ledger = read_ledger(self.ledger_path)
        if ledger.header is None:
            raise RunDirError(f"{self.ledger_path} is missing or has no header line")
        return ledger.header, ledger.steps

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        latest = self.checkpoint_dir / LATEST
        return self.checkpoint_dir / latest.read_text().strip() if latest.exists() else None

    def save_checkpoint(self, step: int, state: dict, secret: dict | None = None) -> None:
        """Complete under a temporary name, renamed, pointed to, then the superseded ones removed.
        ``secret`` (the generator state, if the run keeps it per checkpoint) goes to secret.pt, mode 600."""
        self.checkpoint_dir.mkdir(exist_ok=True)
        name = f"step-{step:07d}"
        target = self.checkpoint_dir / name
        if target == self.latest_checkpoint():
            return  # this very state is already the newest checkpoint
        tmp = tmp_name(target)
        remove(tmp)
        tmp.mkdir()
        try:
            files = {"state.pt": atomic_torch_save(state, tmp / "state.pt")}
            if secret is not None:
                files["secret.pt"] = atomic_torch_save(secret, tmp / "secret.pt", mode=0o600)
            logs = {p.name: {"lines": self._lines[p], "chain": self._chains[p]} for p in self._chains}
            manifest = {"step": step, "files": files, "logs": logs}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            remove(target)  # a stale one from a kill between rename and LATEST
            os.replace(tmp, target)
        except BaseException:
            remove(tmp)
            raise
        fsync_path(self.checkpoint_dir)
        atomic_write_text(self.checkpoint_dir / LATEST, name + "\n")
        for old in self.checkpoint_dir.glob("step-*"):
            if old.name != name:
                remove(old)

    def load_checkpoint(self, checkpoint: Checkpoint | None = None) -> tuple[dict, dict | None]:
        """(public state, secret state or None) of the verified checkpoint; a file torch cannot read is named."""
        checkpoint = checkpoint or (self.state.checkpoint if self.state else None)
        if checkpoint is None:
            raise RunDirError(f"--resume: {self.path} has no complete checkpoint")
        loaded = {}
        for name in ("state.pt", "secret.pt"):
            path = checkpoint.path / name
            if name not in checkpoint.manifest["files"]:
                continue
            try:
                loaded[name] = torch.load(path, weights_only=False, map_location="cpu")
            except Exception as exc:  # unpickling fails in many ways; each means the file is damaged
                raise RunDirError(f"{path} cannot be read ({type(exc).__name__}): the checkpoint is damaged") from None
        return loaded["state.pt"], loaded.get("secret.pt")

    # ------------------------------------------------------------------ final outputs
    def save_model(self, write: Callable[[Path], None], target: Path | None = None) -> None:
        """``write(directory)`` fills a temporary directory; it gets SHA256SUMS and replaces ``target``
        (model/, or model-merged/) whole."""
        target = self.model_dir if target is None else target
        tmp = tmp_name(target)
        remove(tmp)
        tmp.mkdir()
        try:
            write(tmp)
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            sums = "".join(f"{sha256_file(p)}  {p.relative_to(tmp).as_posix()}\n" for p in files)
            atomic_write_text(tmp / MODEL_SUMS, sums)
            for p in files:
                fsync_path(p)
            fsync_path(tmp)
            old = tmp.with_name(tmp.name + ".old")
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            fsync_path(self.path)
            remove(old)
        except BaseException:
            remove(tmp)
            raise

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_path, strict_json(summary, indent=2) + "\n")


def check_model_sums(model_dir: Path) -> None:
    """RunDirError naming the first file of ``model_dir`` whose sha256 differs from SHA256SUMS (if any)."""
    sums = model_dir / MODEL_SUMS
    if not sums.exists():
        return
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        path = model_dir / name
        if not path.is_file():
            raise RunDirError(f"{path} is missing (listed in {sums})")
        if sha256_file(path) != digest:
            raise RunDirError(f"{path} is damaged (its sha256 differs from {sums})")
