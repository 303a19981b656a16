"""The ledger as a resume reads it: what was released, and where the run continues.

Whatever ``ledger.jsonl`` holds was released (docs/design.md section 10). A resume therefore re-applies
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

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import RunDirError
from . import journal
from .journal import Journal

ROW_TYPES = ("header", "step", "stage", "void")


@dataclass
class Ledger:
    """A ledger file, checked: one header first, step rows 1..m in order, stage and void rows in place."""

    path: Path
    header: dict | None = None
    steps: list[dict] = field(default_factory=list)
    stages: dict[int, dict] = field(default_factory=dict)  # stage rows by the step that opens the stage
    voids: list[dict] = field(default_factory=list)
    journal: Journal | None = None  # the file's lines and their checksum chain (journal.py)
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
    """Parse and check ``path`` (missing: an empty ledger): every line's checksum chain, then the rows'
    order. Refuses, with the line, anything a run of this engine cannot have written; a cut last line is
    kept aside in ``torn``."""
    ledger = Ledger(Path(path))
    if not ledger.path.exists():
        return ledger
    ledger.journal = journal.read(ledger.path)
    ledger.torn = ledger.journal.torn
    for number, row in enumerate(ledger.journal.rows, 1):
        _add(ledger, row, f"{ledger.path} line {number}")
    return ledger


def _add(ledger: Ledger, row: dict, where: str) -> None:
    kind = row.get("type")
    if kind not in ROW_TYPES:
        raise RunDirError(f"{where} is not a ledger row of this engine (type {kind!r}): the ledger is damaged")
    if kind == "header":
        if ledger.header is not None or ledger.steps or ledger.voids:
            raise RunDirError(f"{where} is a second header: a ledger has exactly one, first")
        ledger.header = row
        return
    if ledger.header is None:
        raise RunDirError(f"{where}: a {kind} row before the header; the ledger is damaged")
    step = row.get("step")
    expected = ledger.last_step + 1
    if step != expected:
        raise RunDirError(f"{where} should be step {expected} and is a {kind} row for step {step}: damaged")
    if kind == "step":
        ledger.steps.append(row)
    elif kind == "stage":
        ledger.stages[step] = row
    else:
        ledger.voids.append(row)


def void_for_torn_row(ledger: Ledger) -> dict | None:
    """The void row that keeps a cut release counted (when the cut last line had begun to hold released
    values), added to ``ledger.voids``; the caller writes it where the cut line was (``RunDir.continue_from``)."""
    if not ledger.torn_release:
        return None
    void = {
        "type": "void",
        "step": ledger.last_step + 1,
        "reason": "the row of this step was cut by a kill after its released values began to be written; "
        "the release is counted and the step is redone with fresh secret draws",
    }
    ledger.voids.append(void)
    return void
