"""A pytest plugin that appends one JSON line per finished test to ``$PYTEST_OUTCOMES_LOG``.

Why: ``bench/gpu_check.py`` runs the CUDA tests under a hard time cap. A JUnit report is only
written at the end, so a run stopped at its cap would leave no counts; this log keeps every
outcome reached so far. Load it with ``-p bench.pytest_outcomes`` from the checkout's root.
"""

from __future__ import annotations

import json
import os

_config = None


def pytest_configure(config) -> None:
    global _config
    _config = config


def outcome(report) -> str | None:
    """passed, failed, error, skipped, xfailed or xpassed; None for a phase that decides nothing."""
    if hasattr(report, "wasxfail"):
        return "xpassed" if report.passed else "xfailed"
    if report.when == "call":
        return report.outcome
    if report.failed:
        return "error"  # setup or teardown raised
    if report.when == "setup" and report.skipped:
        return "skipped"
    return None


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("PYTEST_OUTCOMES_LOG")
    if not path or (_config is not None and hasattr(_config, "workerinput")):
        return  # no log asked for, or a pytest-xdist worker (its controller logs the same report)
    result = outcome(report)
    if result is None:
        return
    line = {"test": report.nodeid, "outcome": result, "seconds": round(report.duration, 3)}
    if result in ("failed", "error"):
        crash = getattr(report.longrepr, "reprcrash", None)  # "AssertionError: ..." where pytest has it
        text = (crash.message if crash is not None else str(report.longrepr)).strip().splitlines()
        line["message"] = (text[0] if crash is not None else text[-1])[:300] if text else ""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
