"""What a run directory must hold before a resume may touch it; damage is refused with the file's name.

``verify`` only reads. It checks, in this order:

* ``config.json``: JSON, an object, only known keys, values a config accepts;
* ``ledger.jsonl``: every line's checksum chain; one header, first, of this code's direction stream
  version; its ``config_sha256`` equals
  config.json's; step rows numbered 1, 2, 3, ... without a gap, each ZO row with K seeds and K
  finite coefficients; a stage row only just before the step it opens;
* ``metrics.jsonl``: every line's checksum chain, steps never decreasing;
* the checkpoint that ``checkpoint/LATEST`` names (none is fine: a run killed before its first one):
  its ``manifest.json``, the size and sha256 of every file it lists, and the ledger and metrics
  lines it was taken after, which must still be there, with the same chain, at or before the last step.

Only when all of it holds does the caller clean up, cut torn tails or load anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import stream
from ..core.errors import RunDirError, UserError
from ..core.files import sha256_file
from . import journal
from .journal import Journal
from .ledger import Ledger, read_ledger

if TYPE_CHECKING:
    from .run_dir import RunDir

CHECKPOINT_NAME = re.compile(r"^step-(\d{7,})$")
ZO_ROW_LISTS = ("seeds", "released", "coefs")


@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: dict


@dataclass
class RunState:
    """A verified run directory: its saved config, logs and newest checkpoint."""

    config: dict
    ledger: Ledger
    metrics: Journal
    checkpoint: Checkpoint | None

    @property
    def header(self) -> dict:
        return self.ledger.header

    @property
    def last_step(self) -> int:
        return self.ledger.last_step


def config_digest(text: str) -> str:
    """What the ledger header records of config.json: the sha256 of its values that define the run (all
    but the bookkeeping keys), so that runs of one config in two directories have identical ledgers."""
    from .config import TrainConfig
    from .options import flags

    bookkeeping = {f.name for f in flags(TrainConfig) if not f.identity}
    values = {k: v for k, v in json.loads(text).items() if k not in bookkeeping}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def verify(run: RunDir) -> RunState:
    config = verify_config(run)
    ledger = _verify_ledger(run)
    metrics = _verify_metrics(run)
    return RunState(config, ledger, metrics, _verify_checkpoint(run, ledger, metrics))


def verify_config(run: RunDir) -> dict:
    from .config import TrainConfig, validate  # config imports the ops; run_dir stays light without it
    from .options import coerce_mapping

    path = run.config_path
    if not path.exists():
        raise RunDirError(f"--resume: {run.path} holds no run (no config.json)")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} is damaged (not valid JSON: {exc})") from None
    if not isinstance(saved, dict):
        raise RunDirError(f"{path} is damaged (not a JSON object)")
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(saved) - known)
    if unknown:
        raise RunDirError(f"{path} has unknown keys ({', '.join(unknown)}): it was edited or is damaged")
    try:
        validate(TrainConfig(**coerce_mapping(TrainConfig, saved, str(path))))
    except (UserError, TypeError, ValueError) as exc:
        message = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
        raise RunDirError(f"{message} (it was edited or is damaged)") from None
    return saved


def _verify_ledger(run: RunDir) -> Ledger:
    path = run.ledger_path
    if not path.exists():
        raise RunDirError(f"{path} is missing: the run's released steps are gone, so it cannot be resumed")
    ledger = read_ledger(path)  # every line's chain, one header first, rows in step order (ledger.py)
    header = ledger.header
    if header is None or ledger.journal.rows[0] is not header:
        raise RunDirError(f"{path} line 1 is not the ledger header")
    if "first_order" not in header:  # a ZO run: its directions must be the ones this code generates
        stream.check_version(header.get("stream_version"), f"--resume: {path}")
    if header.get("config_sha256") != config_digest(run.config_path.read_text()):
        raise RunDirError(
            f"{run.config_path} does not match the ledger header (config_sha256): it was edited or is damaged"
        )
    k = None
    for number, row in enumerate(ledger.journal.rows[1:], start=2):
        if row.get("type") == "step":
            k = _check_step_row(path, number, row, k)
    return ledger


def _check_step_row(path: Path, number: int, row: dict, k: int | None) -> int | None:
    """A ZO step row has K seeds, K released values, K coefficients, all finite (first-order rows have none)."""
    lists = [row.get(key) for key in ZO_ROW_LISTS]
    if all(v is None for v in lists):
        return k
    size = len(lists[0]) if isinstance(lists[0], list) else -1
    for key, values in zip(ZO_ROW_LISTS, lists):
        ok = isinstance(values, list) and len(values) == size and (k is None or size == k)
        numbers = ok and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        if not numbers:
            raise RunDirError(f"{path} line {number} is damaged ({key!r} is not a list of {k or size} finite numbers)")
    return size


def _verify_metrics(run: RunDir) -> Journal:
    path = run.metrics_path
    if not path.exists():
        raise RunDirError(f"{path} is missing")
    metrics = journal.read(path)
    last = 0
    for number, row in enumerate(metrics.rows, start=1):
        step = row.get("step")
        if not isinstance(step, int) or step < last:
            raise RunDirError(f"{path} line {number} is damaged or out of order (step {step!r} after {last})")
        last = step
    return metrics


def _verify_checkpoint(run: RunDir, ledger: Ledger, metrics: Journal) -> Checkpoint | None:
    latest = run.checkpoint_dir / "LATEST"
    if not latest.exists():
        return None
    name = latest.read_text().strip()
    match = CHECKPOINT_NAME.match(name)
    if match is None:
        raise RunDirError(f"{latest} is damaged (it names {name!r}, not a checkpoint)")
    path = run.checkpoint_dir / name
    if not path.is_dir():
        raise RunDirError(f"{latest} names {name}, which is missing")
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        step, files, logs = manifest["step"], manifest["files"], manifest["logs"]
    except FileNotFoundError:
        raise RunDirError(f"{manifest_path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise RunDirError(f"{manifest_path} is damaged") from None
    if not isinstance(files, dict) or "state.pt" not in files:
        raise RunDirError(f"{manifest_path} is damaged (it lists no state.pt)")
    if step != int(match.group(1)):
        raise RunDirError(f"{manifest_path} is damaged (step {step!r} in a directory named {name})")
    for file, expected in files.items():
        if not isinstance(expected, dict):
            raise RunDirError(f"{manifest_path} is damaged (no size and sha256 for {file})")
        _check_file(path / file, expected)
    for log in (ledger.journal, metrics):
        _check_log_position(log, logs.get(log.path.name), manifest_path)
    taken_after = ledger.journal.rows[max(logs["ledger.jsonl"]["lines"] - 1, 0)]
    if taken_after.get("step") != step:
        raise RunDirError(f"{manifest_path} says step {step}, but the ledger line it follows is step {taken_after}")
    return Checkpoint(path, step, manifest)


def _check_file(path: Path, expected: dict) -> None:
    if not path.is_file():
        raise RunDirError(f"{path} is missing")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise RunDirError(f"{path} is damaged ({size} bytes, the checkpoint manifest says {expected.get('bytes')})")
    if sha256_file(path) != expected.get("sha256"):
        raise RunDirError(f"{path} is damaged (its sha256 differs from the checkpoint manifest's)")


def _check_log_position(log: Journal, where: dict | None, manifest_path: Path) -> None:
    """The checkpoint was taken after line ``where["lines"]`` of ``log``; that line must still be there."""
    if not isinstance(where, dict) or not isinstance(where.get("lines"), int):
        raise RunDirError(f"{manifest_path} is damaged (no position in {log.path.name})")
    lines = where["lines"]
    if lines > len(log.rows):
        raise RunDirError(
            f"{log.path} has {len(log.rows)} lines, but the checkpoint was taken after line {lines}: lines were lost"
        )
    if (log.chains[lines - 1] if lines else "") != where.get("chain"):
        raise RunDirError(
            f"{log.path} was rewritten up to the checkpoint (line {lines} differs from when it was taken)"
        )
