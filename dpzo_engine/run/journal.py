"""Append-only JSONL logs (ledger.jsonl, metrics.jsonl) whose every line can be checked.

Each line is one JSON object that ends with ``"chain": <hex>``, the sha256 of the previous line's chain
and of this line's text up to the chain field. A changed, lost, reordered or inserted line breaks
the chain at that line, so damage is found and named by line number. Anyone can recompute the chain
(it is not a signature): it detects damage, not a forger.

A line is written with one ``write`` and fsynced. A kill in the middle of it leaves bytes after the
last newline: a torn tail, which ``read`` reports apart (``torn``; a complete line whose newline alone
was cut is kept) and ``keep_lines`` removes once the caller has decided to continue. A line that ends
with a newline and does not check is damage.
Values are strict JSON: NaN and infinities are written as null (``finite_or_none``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import RunDirError

CHAIN_KEY = "chain"
_TAIL = re.compile(r', "chain": "([0-9a-f]{64})"\}$')


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def chain_of(previous: str, body: str) -> str:
    return hashlib.sha256(f"{previous}\n{body}".encode()).hexdigest()


def chained_line(row: dict, previous: str) -> tuple[str, str]:
    """(the line to append, its chain) for ``row`` after a line whose chain is ``previous``."""
    if CHAIN_KEY in row:
        raise ValueError(f"a logged row may not set {CHAIN_KEY!r}")
    text = json.dumps(finite_or_none(row), allow_nan=False)
    if text == "{}":
        raise ValueError("a logged row may not be empty")
    body = text[:-1]
    chain = chain_of(previous, body)
    return f'{body}, "{CHAIN_KEY}": "{chain}"}}\n', chain


@dataclass
class Journal:
    """The checked content of one JSONL log: its rows (without the chain field) and where it ends."""

    path: Path
    rows: list[dict] = field(default_factory=list)
    chains: list[str] = field(default_factory=list)  # chain after each row
    ends: list[int] = field(default_factory=list)  # byte offset just after each row's newline
    torn: bytes = b""  # bytes after the last newline that are no complete line (an append cut by a kill)
    unterminated: bool = False  # the last row is complete but its newline was cut: kept

    @property
    def torn_bytes(self) -> int:
        return len(self.torn)

    @property
    def chain(self) -> str:
        return self.chains[-1] if self.chains else ""

    def prefix_end(self, lines: int) -> int:
        """Byte offset just after the first ``lines`` rows."""
        return self.ends[lines - 1] if lines else 0


def read(path: Path) -> Journal:
    """Parse and check every complete line of ``path``; RunDirError names the first damaged line."""
    data = path.read_bytes()
    journal = Journal(path)
    cut = data.rfind(b"\n") + 1
    offset = 0
    for number, raw in enumerate(data[:cut].split(b"\n")[:-1], start=1):
        offset += len(raw) + 1
        row, chain = _check_line(path, number, raw, journal.chain)
        journal.rows.append(row)
        journal.chains.append(chain)
        journal.ends.append(offset)
    tail = data[cut:]
    if tail:
        try:  # a complete line whose newline was cut: keep it
            row, chain = _check_line(path, len(journal.rows) + 1, tail, journal.chain)
        except RunDirError:
            journal.torn = tail
        else:
            journal.rows.append(row)
            journal.chains.append(chain)
            journal.ends.append(len(data))
            journal.unterminated = True
    return journal


def _check_line(path: Path, number: int, raw: bytes, previous: str) -> tuple[dict, str]:
    """(row without its chain field, chain) of one line, or RunDirError naming it."""
    try:
        line = raw.decode()
    except UnicodeDecodeError:
        raise RunDirError(f"{path} line {number} is damaged (not UTF-8 text)") from None
    match = _TAIL.search(line)
    if match is None:
        raise RunDirError(f"{path} line {number} is damaged (no checksum chain at its end)")
    if chain_of(previous, line[: match.start()]) != match.group(1):
        raise RunDirError(f"{path} line {number} is damaged or out of place (its checksum chain does not match)")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} line {number} is damaged (not valid JSON: {exc.msg})") from None
    if not isinstance(row, dict):
        raise RunDirError(f"{path} line {number} is damaged (not a JSON object)")
    return row, row.pop(CHAIN_KEY)


def append(path: Path, row: dict, previous: str) -> str:
    """Append ``row`` as one chained line with one write, fsynced; returns its chain."""
    line, chain = chained_line(row, previous)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = line.encode()
        written = os.write(fd, data)
        if written != len(data):  # a short write leaves a torn tail, as a kill would
            raise OSError(errno.ENOSPC, "No space left on device (short write)", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)
    return chain


def write_lines(rows: list[dict]) -> str:
    """A whole chained log (for a new file, or for tests that rewrite one)."""
    text, previous = [], ""
    for row in rows:
        line, previous = chained_line(row, previous)
        text.append(line)
    return "".join(text)


def keep_lines(log: Journal, lines: int, then: list[dict] = ()) -> str:
    """Make ``log``'s file its first ``lines`` lines, newline-terminated, followed by the rows ``then``;
    returns the chain of its last line. Only a tail is changed: truncated in place, or, when rows are to
    follow the cut, the whole file replaced atomically (a kill leaves the old file or the new one)."""
    end = log.prefix_end(lines)
    chain = log.chains[lines - 1] if lines else ""
    newline = b"\n" if lines and log.unterminated and lines == len(log.rows) else b""
    extra = []
    for row in then:
        line, chain = chained_line(row, chain)
        extra.append(line)
    size = log.path.stat().st_size
    if extra:
        from .atomic import atomic_write_text  # atomic imports torch; journal stays light without it

        atomic_write_text(log.path, (log.path.read_bytes()[:end] + newline).decode() + "".join(extra))
    elif size != end or newline:
        with open(log.path, "r+b") as f:
            f.truncate(end)
            f.seek(end)
            f.write(newline)
            f.flush()
            os.fsync(f.fileno())
    return chain
