"""Optional TensorBoard logging (``--report-to tensorboard``) of the rows of metrics.jsonl.

metrics.jsonl stays the record; TensorBoard gets the same numbers as scalars named
``<split>/<key>`` (``train/loss``, ``train/epsilon``, ``dev/accuracy``, ``test/accuracy``) at
their step, through ``torch.utils.tensorboard``. The tensorboard package is optional: asking
for it without it installed is a one-line ConfigError before anything loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..core.errors import ConfigError

REPORT_TO = ("none", "tensorboard")
INSTALL_HINT = "pip install tensorboard (or dpzo-engine[tensorboard])"


def require(report_to: str) -> None:
    """Refuse a reporting backend that is not installed (called while validating the config)."""
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError(f"--report-to tensorboard needs the tensorboard package: {INSTALL_HINT}") from None


class TensorBoardLog:
    """Writes each metrics row as scalars under ``log_dir``."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    @classmethod
    def resumed(cls, log_dir: Path, rows: Iterable[dict]) -> TensorBoardLog:
        """A resumed run's log: whatever earlier attempts wrote is purged, and ``rows`` (metrics.jsonl as the
        resume kept it) are written again. A kill can fall between a metrics line and its events, so the
        events are rebuilt from the record rather than trusted."""
        log = cls(log_dir, purge_step=0)  # TensorBoard drops earlier events at steps >= 0: all of them
        log.write(rows)
        return log

    def __call__(self, row: dict) -> None:
        self.write([row])  # rows come every --log-every steps: flushed, so a killed run keeps what it logged

    def write(self, rows: Iterable[dict]) -> None:
        for row in rows:
            step = int(row.get("step", 0))
            split = row.get("split", "train")
            for key, value in row.items():
                if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
