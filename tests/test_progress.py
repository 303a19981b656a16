"""Progress where a person waits (issue 13 item 6): evaluation's own progress bar, and optional
TensorBoard logging of the metrics (``--report-to tensorboard``) beside metrics.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import pytest
import torch
from test_train_cli import base_args

from dpzo_engine.core.errors import ConfigError
from dpzo_engine.run.config import parse_args
from dpzo_engine.run.reporting import TensorBoardLog
from dpzo_engine.run.run_dir import read_jsonl
from dpzo_engine.train import main as train_main
from dpzo_engine.zo.private_zo import PrivateZO

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard log directory, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_evaluation_shows_its_own_progress_bar(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(base_args(assets, out, "--steps", "4", "--eval-every", "2")) == 0
    err = capsys.readouterr().err
    for desc in ("eval test (untrained)", "eval dev", "eval test"):
        assert f"{desc}:" in err, desc
    assert "32/32" in err and "ex/s" in err  # the test split's 32 examples counted, with a rate


def test_evaluate_without_a_label_prints_nothing(assets, capsys):
    """The library function stays quiet unless asked (benchmarks call it in loops)."""
    from dpzo_engine.data import get_task
    from dpzo_engine.heads import build_head, evaluate
    from dpzo_engine.models.loading import load_model_and_tokenizer

    model_dir, data_dir = assets
    task = get_task("local", data_dir=str(data_dir))
    model, tokenizer = load_model_and_tokenizer(str(model_dir), task.num_labels, dtype=torch.float32)
    head = build_head("sequence-classification", task)
    capsys.readouterr()
    quiet = evaluate(model, head, task.test, tokenizer, 8, 16)
    assert capsys.readouterr().err == ""
    loud = evaluate(model, head, task.test, tokenizer, 8, 16, progress="eval here")
    assert "eval here:" in capsys.readouterr().err and loud == quiet


def test_tensorboard_gets_the_metrics_rows(assets, tmp_path):
    out = tmp_path / "run"
    assert train_main(base_args(assets, out, "--eval-every", "4", "--report-to", "tensorboard")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = scalars(out / "tensorboard")
    assert {"train/loss", "train/epsilon", "train/fraction_clipped", "dev/accuracy", "test/accuracy"} <= set(logged)
    for split, key in (("train", "loss"), ("train", "epsilon"), ("dev", "accuracy"), ("test", "accuracy")):
        expected = [(r["step"], r[key]) for r in rows if r.get("split", "train") == split]
        got = logged[f"{split}/{key}"]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    assert [s for s, _ in logged["test/accuracy"]] == [0, 6]  # untrained and final


def test_a_resume_rebuilds_the_events_from_metrics_jsonl(tmp_path):
    """A killed attempt's events may hold steps the resume redoes, and may lack the last row of
    metrics.jsonl (a kill between the two writes): after a resume, TensorBoard shows exactly
    metrics.jsonl's rows, then the new steps."""
    killed = TensorBoardLog(tmp_path)
    for step in (1, 2, 3, 5, 6):  # step 4 never reached the events; 5 and 6 are redone after the resume
        killed({"step": step, "loss": 10.0 + step})
    killed.writer.file_writer.flush()  # no close: as if killed
    kept = [{"step": 0, "split": "test", "accuracy": 0.5}, *({"step": s, "loss": 10.0 + s} for s in (1, 2, 3, 4))]
    resumed = TensorBoardLog.resumed(tmp_path, kept)
    for step in (5, 6):
        resumed({"step": step, "loss": -float(step)})
    resumed.close()
    logged = scalars(tmp_path)
    assert logged["train/loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, -5.0), (6, -6.0)]
    assert logged["test/accuracy"] == [(0, 0.5)]


def test_a_resume_through_the_run_directory_leaves_tensorboard_equal_to_metrics_jsonl(
    assets, tmp_path, capsys, monkeypatch
):
    """End to end: SIGTERM during step 3 (checkpoint at 3), then the events of a later attempt that lost
    everything but a redone step 4, then --resume: TensorBoard holds exactly the rows of metrics.jsonl."""
    out = tmp_path / "run"
    step = PrivateZO.step

    def terminated(self, *a, **k):
        if self.steps_done == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *a, **k)

    monkeypatch.setattr(PrivateZO, "step", terminated)
    assert train_main(base_args(assets, out, "--report-to", "tensorboard")) == 143
    monkeypatch.setattr(PrivateZO, "step", step)
    shutil.rmtree(out / "tensorboard")
    stale = TensorBoardLog(out / "tensorboard")
    stale({"step": 4, "loss": 99.0})  # a redone step's old value; steps 0-2 never reached the events
    stale.writer.file_writer.flush()  # no close: as if killed
    assert train_main(base_args(assets, out, "--report-to", "tensorboard", "--resume")) == 0
    assert "resuming" in capsys.readouterr().err
    rows = read_jsonl(out / "metrics.jsonl")
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, int | float) and not isinstance(value, bool):
                expected.setdefault(f"{row.get('split', 'train')}/{key}", []).append((row["step"], value))
    logged = scalars(out / "tensorboard")
    assert set(logged) == set(expected)
    for tag, series in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in series], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in series], rel=1e-6), tag
    assert [s for s, _ in logged["train/loss"]] == [2, 4, 6] and 99.0 not in [v for _, v in logged["train/loss"]]


def test_tensorboard_missing_is_one_clean_error(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        parse_args(["--report-to", "tensorboard"])
    out = tmp_path / "run"
    assert train_main(base_args(assets, out, "--report-to", "tensorboard")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --report-to tensorboard needs") and not out.exists()
    assert parse_args(["--report-to", "none"]).report_to == "none"  # the default needs nothing
