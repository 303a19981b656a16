"""The output directory of a run: config, metrics, ledger, checkpoints, final model.

Layout (all writes atomic: a temporary file then ``os.replace``; ledger lines are
single appended writes followed by fsync):

    config.json              the resolved TrainConfig
    metrics.jsonl            one JSON object per log step, plus evaluations
    ledger.jsonl             line 1: header (public run facts); then one line per step:
                             seeds, rounding seed, lambda, the released noisy K-vector,
                             the exact fp32 update coefficients, epsilon spent so far
    checkpoint/LATEST        name of the newest complete checkpoint directory
    checkpoint/step-NNNNNNN/state.pt    public state (parameter buffers, step, accountant)
    checkpoint/step-NNNNNNN/secret.pt   SECRET: sampling/noise generator state (mode 600)
    model/                   save_pretrained (safetensors) + tokenizer
    summary.json             final accuracies, epsilon spent, timings

Everything but ``secret.pt`` is public post-processing; delete the checkpoint directory
before sharing a run (its generator state would let anyone recompute the noise).
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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path, mode: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    if mode is not None:
        os.chmod(tmp, mode)
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

    # ------------------------------------------------------------------ set-up
    def check_start(self, cfg: TrainConfig) -> bool:
        """Validate the directory for a fresh run or a resume; True if there is a checkpoint
        to resume from.  Raises ConfigError before anything is written."""
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
            return self.latest_checkpoint() is not None
        if self.config_path.exists():
            raise ConfigError(
                f"{self.path} already holds a run; pass --resume to continue it or pick another --output-dir"
            )
        return False

    def start(self, cfg: TrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            atomic_write_text(self.config_path, cfg.to_json() + "\n")
            for p in (self.metrics_path, self.ledger_path):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ logs
    @staticmethod
    def _append(path: Path, row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def log_metrics(self, row: dict) -> None:
        self._append(self.metrics_path, row)

    def log_ledger(self, row: dict) -> None:
        self._append(self.ledger_path, row)

    def truncate_logs(self, step: int) -> None:
        """Drop log lines after ``step`` (they are redone, identically, after a resume)."""
        for path in (self.metrics_path, self.ledger_path):
            rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def ledger(self) -> tuple[dict, list[dict]]:
        rows = read_jsonl(self.ledger_path)
        if not rows or rows[0].get("type") != "header":
            raise ConfigError(f"{self.ledger_path} is missing or has no header line")
        return rows[0], [r for r in rows[1:] if r.get("type") == "step"]

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        latest = self.checkpoint_dir / "LATEST"
        if not latest.exists():
            return None
        ckpt = self.checkpoint_dir / latest.read_text().strip()
        return ckpt if (ckpt / "state.pt").exists() and (ckpt / "secret.pt").exists() else None

    def save_checkpoint(self, step: int, state: dict, secret: dict) -> None:
        self.checkpoint_dir.mkdir(exist_ok=True)
        name = f"step-{step:07d}"
        target = self.checkpoint_dir / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        atomic_torch_save(state, target / "state.pt")
        atomic_torch_save(secret, target / "secret.pt", mode=0o600)
        atomic_write_text(self.checkpoint_dir / "LATEST", name + "\n")
        for old in self.checkpoint_dir.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> tuple[dict, dict]:
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise ConfigError(f"--resume: {self.path} has no complete checkpoint")
        state = torch.load(ckpt / "state.pt", weights_only=False)
        secret = torch.load(ckpt / "secret.pt", weights_only=False)
        return state, secret

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2) + "\n")
