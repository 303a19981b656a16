"""The ledger as a resume reads it: what was released, and where the run continues.

Whatever ``ledger.jsonl`` holds was released (DESIGN section 10). A resume therefore re-applies
the step rows past the last checkpoint from their public values and never computes them again,
and the accountant counts every release the file holds. The file is append-only with one header.

One case needs care: a kill can cut the last line (a row is one write, but a long row spans
several kernel pages). The cut bytes are the only thing ever removed from the ledger. If they
already hold released values (the ``"released"`` key was written), part of a release may have
been seen: that release is counted, a ``void`` row records it (``{"type": "void", "step": t}``),
and step t is redone at the next secret address, with fresh batch and noise, so no two releases
of one step share their noise. A cut row without released values published nothing: it is simply
redone, with the same draws.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError

ROW_TYPES = ("header", "step", "stage", "void")


@dataclass
class Ledger:
    """A ledger file, checked: one header first, step rows 1..m in order, stage and void rows in place."""

    path: Path
    header: dict | None = None
    steps: list[dict] = field(default_factory=list)
    stages: dict[int, dict] = field(default_factory=dict)  # stage rows by the step that opens the stage
    voids: list[dict] = field(default_factory=list)
    complete_bytes: int = 0  # length of the file up to the end of its last complete line
    torn: bytes = b""  # an incomplete last line (cut by a kill), if any

    @property
    def last_step(self) -> int:
        return self.steps[-1]["step"] if self.steps else 0

    @property
    def releases(self) -> int:
        """Releases the file holds: each step row, and each void row (a release cut while it was written)."""
        return len(self.steps) + len(self.voids)

    @property
    def torn_release(self) -> bool:
        """The cut line had started to write released values: treat that release as made."""
        return b'"released"' in self.torn


def read_ledger(path: Path) -> Ledger:
    """Parse and check ``path`` (missing: an empty ledger). Refuses, with the line, anything a run of
    this engine cannot have written; a cut last line is kept aside in ``torn``."""
    ledger = Ledger(Path(path))
    if not ledger.path.exists():
        return ledger
    data = ledger.path.read_bytes()
    end = data.rfind(b"\n") + 1
    ledger.complete_bytes, ledger.torn = end, data[end:]
    if ledger.torn:
        try:  # a complete row whose newline was cut: keep it
            json.loads(ledger.torn)
            ledger.complete_bytes, ledger.torn = len(data), b""
        except ValueError:
            pass
    for number, line in enumerate(data[: ledger.complete_bytes].splitlines(), 1):
        if not line.strip():
            continue
        where = f"{ledger.path} line {number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"{where} is not valid JSON: the ledger is damaged") from None
        _add(ledger, row, where)
    return ledger


def _add(ledger: Ledger, row: dict, where: str) -> None:
    kind = row.get("type") if isinstance(row, dict) else None
    if kind not in ROW_TYPES:
        raise ConfigError(f"{where} is not a ledger row of this engine (type {kind!r}): the ledger is damaged")
    if kind == "header":
        if ledger.header is not None or ledger.steps or ledger.voids:
            raise ConfigError(f"{where}: a second header; a ledger has exactly one, first")
        ledger.header = row
        return
    if ledger.header is None:
        raise ConfigError(f"{where}: a {kind} row before the header; the ledger is damaged")
    step = row.get("step")
    expected = ledger.last_step + 1
    if step != expected:
        raise ConfigError(f"{where}: a {kind} row for step {step} where step {expected} comes next; damaged")
    if kind == "step":
        ledger.steps.append(row)
    elif kind == "stage":
        ledger.stages[step] = row
    else:
        ledger.voids.append(row)


def seal(ledger: Ledger) -> dict | None:
    """Make the file end with a complete line: drop a cut last line, and when it had begun to hold
    released values, append the void row that keeps that release counted. Returns the row appended."""
    if not ledger.torn:
        return None
    void = None
    with open(ledger.path, "r+b") as f:
        f.truncate(ledger.complete_bytes)
        if ledger.torn_release:
            void = {
                "type": "void",
                "step": ledger.last_step + 1,
                "reason": "the row of this step was cut by a kill after its released values began to be written; "
                "the release is counted and the step is redone with fresh secret draws",
            }
            f.seek(ledger.complete_bytes)
            f.write((json.dumps(void) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    if void is not None:
        ledger.voids.append(void)
    ledger.complete_bytes, ledger.torn = ledger.path.stat().st_size, b""
    return void
