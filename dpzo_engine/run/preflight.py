"""Checks on the disk before a run writes anything: where it writes, and whether it will fit.

``check_output_dir`` runs before the data and the model load (it needs only the path), so a typo in
``--output-dir`` costs a second, not a model load. ``check_free_space`` runs once the model is loaded
(it needs the sizes) and still before the first write. The estimate is deliberately simple and on
the large side: the final model in its dtype, two checkpoints (a new one is complete before the old one
goes), and the ledger and metrics lines still to come. A run can still meet a full disk (other
writers share it); that ends with one line, the last checkpoint intact, and ``--resume`` continues.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..core.errors import RunDirError

MiB = 1 << 20
SLACK_BYTES = 4 * MiB  # tokenizer, configs, summary, manifests
LEDGER_ROW_BYTES = 330  # one step row without its K-dependent fields: type, step, λ, lr, ε, rounding seed, chain
LEDGER_BYTES_PER_DIRECTION = 75  # a seed, a released value and a coefficient, as JSON text
METRICS_ROW_BYTES = 450


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (what a fresh run's mkdir would start from)."""
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def _why_not_writable(path: Path) -> str | None:
    if os.access(path, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def check_output_dir(path: Path, resume: bool) -> None:
    """The output directory is a directory we can write (or can be made in one); RunDirError otherwise."""
    path = Path(os.path.abspath(path))
    if os.path.lexists(path):
        if not path.is_dir():
            raise RunDirError(f"--output-dir {path} is a file, not a directory")
        where = path
    else:
        if resume:
            raise RunDirError(f"--resume: {path} holds no run (it does not exist)")
        where = _existing_ancestor(path)
        if not where.is_dir():
            raise RunDirError(f"--output-dir {path} is below {where}, which is a file")
    reason = _why_not_writable(where)
    if reason:
        raise RunDirError(f"--output-dir {path} is not writable ({where}: {reason})")


def ledger_bytes(steps: int, num_directions: int) -> int:
    return steps * (LEDGER_ROW_BYTES + LEDGER_BYTES_PER_DIRECTION * num_directions)


def estimate_bytes(
    model_bytes: int, checkpoint_bytes: int, steps_left: int, num_directions: int, log_every: int
) -> dict[str, int]:
    """What the rest of a run will write, by part (bytes)."""
    return {
        "model": model_bytes + SLACK_BYTES,
        "checkpoints": 2 * checkpoint_bytes,
        "ledger": ledger_bytes(steps_left, num_directions),
        "metrics": (steps_left // max(log_every, 1) + 2) * METRICS_ROW_BYTES,
    }


def check_free_space(path: Path, need: dict[str, int]) -> None:
    """RunDirError when the file system holding ``path`` has less free space than ``need`` adds up to."""
    free = shutil.disk_usage(_existing_ancestor(Path(os.path.abspath(path)))).free
    total = sum(need.values())
    if total > free:
        parts = ", ".join(f"{k} {_size(v)}" for k, v in need.items() if v)
        raise RunDirError(
            f"not enough free space for {path}: the run needs about {_size(total)} ({parts}) and "
            f"{_size(free)} is free; free some space or pick another --output-dir"
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
