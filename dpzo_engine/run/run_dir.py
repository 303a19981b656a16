"""The output directory of a run: config, metrics, ledger, checkpoints, final model.

Layout (all writes atomic: a temporary file then ``os.replace``; ledger lines are
single appended writes followed by fsync):

    config.json              the resolved TrainConfig
    secret.key               SECRET: the key of the sampling and noise generator (mode 600 from creation)
    metrics.jsonl            one JSON object per log step, plus evaluations (local: computed from the data)
    ledger.jsonl             line 1: header (public run facts); then one line per step:
                             seeds, rounding seed, lambda, the released noisy K-vector,
                             the exact fp32 update coefficients, epsilon spent so far
                             (append-only: a resume re-applies these rows, never recomputes them)
    checkpoint/LATEST        name of the newest complete checkpoint directory
    checkpoint/step-NNNNNNN/state.pt    public state (parameter buffers, step, accountant)
    model/                   save_pretrained (safetensors) + tokenizer + README.md (model card) + privacy.json
    summary.json             final accuracies, epsilon spent, timings

Delete ``secret.key`` before sharing a run: with it anyone can recompute the noise. The ledger, the
checkpoints and the model are post-processing of the DP releases; metrics.jsonl is not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError
from .config import TrainConfig
from .ledger import read_ledger


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL log. A torn last line (the process was killed mid-append) is dropped:
    its step is redone after a resume. A malformed line anywhere else is corruption."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ConfigError(f"{path} line {i + 1} is not valid JSON: the run directory is corrupted") from None
    return rows


class RunDir:
    """Paths and atomic I/O of one run's output directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.ledger_path = self.path / "ledger.jsonl"
        self.checkpoint_dir = self.path / "checkpoint"
        self.model_dir = self.path / "model"
        self.summary_path = self.path / "summary.json"
        self.secret_path = self.path / "secret.key"

    # ------------------------------------------------------------------ set-up
    def check_start(self, cfg: TrainConfig) -> bool:
        """Validate the directory for a fresh run or a resume; True if the run has begun releasing
        (its ledger has a header): the resume then continues from the ledger. A resume of a run
        killed before its header starts it again (nothing was released). Raises ConfigError before
        anything is written."""
        if cfg.resume:
            if not self.config_path.exists():
                raise ConfigError(f"--resume: {self.path} holds no run (no config.json)")
            saved = json.loads(self.config_path.read_text())
            ours = cfg.identity()
            theirs = TrainConfig(**{**saved, "resume": True}).identity()
            diff = sorted(k for k in ours if ours[k] != theirs.get(k))
            if diff:
                details = ", ".join(f"{k}: run has {theirs.get(k)!r}, now {ours[k]!r}" for k in diff)
                raise ConfigError(f"--resume: {self.path} was made with a different config ({details})")
            started = read_ledger(self.ledger_path).header is not None
            if not started and self.latest_checkpoint() is not None:
                raise ConfigError(
                    f"--resume: {self.ledger_path} is missing or has no header, but {self.path} has checkpoints: "
                    "the run directory is damaged"
                )
            return started
        if self.config_path.exists():
            raise ConfigError(
                f"{self.path} already holds a run; pass --resume to continue it or pick another --output-dir"
            )
        return False

    def start(self, cfg: TrainConfig) -> None:
        """A run from its first step (also a resume of a run killed before its ledger header)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            atomic_write_text(self.config_path, cfg.to_json() + "\n")
        for p in (self.metrics_path, self.ledger_path):
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ logs
    @staticmethod
    def _append(path: Path, row: dict) -> None:
        """One line, appended with as few write calls as the kernel allows (one, for rows up to a page
        or so), then synced: a kill leaves the line whole or cut, never interleaved."""
        data = (json.dumps(row) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def log_metrics(self, row: dict) -> None:
        self._append(self.metrics_path, row)

    def log_ledger(self, row: dict) -> None:
        self._append(self.ledger_path, row)

    def trim_metrics(self, step: int) -> None:
        """Drop metrics lines after ``step`` and a torn last line (local diagnostics; the ledger is never
        rewritten: a resume continues it)."""
        rows = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def ledger(self) -> tuple[dict, list[dict]]:
        """(header, step rows) of a finished or interrupted run's ledger (checked; a torn last line is left out)."""
        ledger = read_ledger(self.ledger_path)
        if ledger.header is None:
            raise ConfigError(f"{self.ledger_path} is missing or has no header line")
        return ledger.header, ledger.steps

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        latest = self.checkpoint_dir / "LATEST"
        if not latest.exists():
            return None
        ckpt = self.checkpoint_dir / latest.read_text().strip()
        return ckpt if (ckpt / "state.pt").exists() else None

    def save_checkpoint(self, step: int, state: dict) -> None:
        """Public state only: the secret is the run's key (``secret.key``), the same for every step."""
        self.checkpoint_dir.mkdir(exist_ok=True)
        name = f"step-{step:07d}"
        target = self.checkpoint_dir / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        atomic_torch_save(state, target / "state.pt")
        atomic_write_text(self.checkpoint_dir / "LATEST", name + "\n")
        for old in self.checkpoint_dir.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> dict | None:
        """The newest complete checkpoint's state, or None when the run has none yet."""
        ckpt = self.latest_checkpoint()
        return None if ckpt is None else torch.load(ckpt / "state.pt", weights_only=False)

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2) + "\n")
