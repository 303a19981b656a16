"""End to end: the trainer CLI on a tiny local model and local CSV data.

Covers the output directory, resume after a SIGKILL (bit-for-bit equal to an
uninterrupted run), ledger replay, and bad input (one line, exit code 2, nothing written).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpzo_engine.run import journal
from dpzo_engine.run.run_dir import read_jsonl
from dpzo_engine.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def base_args(assets, out: Path, *extra: str) -> list[str]:
    model_dir, data_dir = assets
    return [
        "--model", str(model_dir), "--task", "local", "--data-dir", str(data_dir), "--trainable", "all",
        "--max-length", "16", "--batch-size", "8", "--steps", "6", "--num-directions", "2", "--clip", "1.0",
        "--lr", "0.05", "--log-every", "2", "--save-every", "2", "--eval-batch-size", "32",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip


def test_run_writes_everything(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(base_args(assets, out)) == 0
    printed = capsys.readouterr().out
    assert "untrained" in printed and "epsilon spent" in printed and str(out) in printed
    for name in ("config.json", "metrics.jsonl", "ledger.jsonl", "summary.json", "model/config.json"):
        assert (out / name).exists(), name
    assert list((out / "model").glob("*.safetensors"))
    assert (out / "model" / "tokenizer.json").exists() or (out / "model" / "vocab.txt").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["epsilon_spent"] <= 2.0
    ledger = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert ledger[0]["type"] == "header" and len(ledger) == 7
    assert all(len(r["released"]) == 2 and len(r["seeds"]) == 2 for r in ledger[1:])
    assert [r["epsilon"] for r in ledger[1:]] == sorted(r["epsilon"] for r in ledger[1:])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "split" not in m]
    assert [m["step"] for m in steps] == [2, 4, 6]
    assert steps[-1]["forwards"] > 0 and steps[-1]["passes"] == 6 * 5  # 2K+1 passes per step
    # RNG work per trainable weight and step: 4K - 1 direction values (central differences), K = 2
    assert [m["direction_values_per_weight_step"] for m in steps] == [7.0, 7.0, 7.0]
    assert summary["direction_values_per_weight_step"] == 7.0


def test_max_length_defaults_to_the_tasks_and_truncation_is_noted(assets, tmp_path, capsys):
    args = base_args(assets, tmp_path / "default", "--steps", "2")
    i = args.index("--max-length")
    del args[i : i + 2]  # the task's default: 128 for local files
    assert train_main(args) == 0
    header = json.loads((tmp_path / "default" / "ledger.jsonl").read_text().splitlines()[0])
    assert header["max_length"] == 128 and "note:" not in capsys.readouterr().err
    assert train_main(base_args(assets, tmp_path / "short", "--steps", "2", "--max-length", "3")) == 0
    err = capsys.readouterr().err
    assert "training examples fill --max-length 3 tokens" in err  # tiny-BERT: [CLS] word [SEP] fills 3


def test_replay_reproduces_the_model(assets, tmp_path):
    out = tmp_path / "run"
    assert train_main(base_args(assets, out)) == 0
    from dpzo_engine.replay import main as replay_main

    assert replay_main([str(out), "--verify", "--out", str(tmp_path / "replayed")]) == 0
    a = load_file(next((out / "model").glob("*.safetensors")))
    b = load_file(next((tmp_path / "replayed").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore::dpzo_engine.privacy.NotPrivateWarning")  # the debug seed, on purpose
def test_direction_cache_trains_the_same_bits_with_half_the_direction_values(assets, tmp_path, capsys):
    """--direction-cache-gb (a cache over part of the weights, then all of them) releases the same values and
    saves the same model as a run without it (a debug noise seed makes the noise repeat); the metrics show the
    generation it saved, 2K - 1 values per weight instead of 4K - 1, and a replay without the cache verifies it."""
    seeded = ("--steps", "4", "--noise-seed", "5")
    assert train_main(base_args(assets, tmp_path / "plain", *seeded)) == 0
    plain = [json.loads(x) for x in (tmp_path / "plain" / "ledger.jsonl").read_text().splitlines()]
    weights = plain[0]["trainable_numel"]
    for name, gb in (("part", 4 * (weights // 3) / 1e9), ("all", 1.0)):
        out = tmp_path / name
        capsys.readouterr()
        assert train_main(base_args(assets, out, *seeded, "--direction-cache-gb", f"{gb!r}")) == 0
        assert "direction cache:" in capsys.readouterr().err
        ledger = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
        assert ledger[1:] == plain[1:] and ledger[1]["released"]
        a = load_file(next((out / "model").glob("*.safetensors")))
        b = load_file(next((tmp_path / "plain" / "model").glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        summary = json.loads((out / "summary.json").read_text())
        per_weight = summary["direction_values_per_weight_step"]
        assert per_weight == 3.0 if name == "all" else 3.0 < per_weight < 7.0  # K = 2
    from dpzo_engine.replay import main as replay_main

    assert replay_main([str(tmp_path / "all"), "--verify"]) == 0


def test_run_trained_with_triton_replays_bit_for_bit_on_the_cpu(assets, tmp_path):
    """Stream v2: a run made with the Triton kernels (the interpreter here, a GPU in production) rebuilds
    exactly from its ledger with the C++ kernels and with the PyTorch reference."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    out = tmp_path / "run"
    assert train_main(base_args(assets, out, "--backend", "triton", "--trainable", "head,last:1", "--steps", "4")) == 0
    header = json.loads((out / "ledger.jsonl").read_text().splitlines()[0])
    assert header["backend"] == "triton" and header["stream_version"] == 2 and header["trainable_numel"] > 9_000
    from dpzo_engine.replay import main as replay_main

    for backend in ("cpu", "reference"):
        assert replay_main([str(out), "--verify", "--backend", backend]) == 0, backend


def test_replay_and_resume_refuse_another_stream_version(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(base_args(assets, out, "--steps", "4")) == 0  # leaves the step-2 checkpoint
    from dpzo_engine.replay import main as replay_main

    rows = read_jsonl(out / "ledger.jsonl")
    header = rows[0]
    assert header["stream_version"] == 2
    capsys.readouterr()
    for recorded in (None, 1, 3):  # no field: a ledger from before versions existed, i.e. version 1
        edited = {k: v for k, v in header.items() if k != "stream_version"}
        if recorded is not None:
            edited["stream_version"] = recorded
        (out / "ledger.jsonl").write_text(journal.write_lines([edited, *rows[1:]]))  # its chain stays consistent
        assert replay_main([str(out)]) == 2
        assert train_main([*base_args(assets, out, "--steps", "4"), "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        version = 1 if recorded is None else recorded
        assert len(err) == 2 and all(line.startswith("error: ") for line in err), err
        assert all(f"direction stream version {version}" in line for line in err), err


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dpzo_engine.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_resume_after_kill_matches_uninterrupted(assets, tmp_path, capsys):
    steps = ["--steps", "40", "--save-every", "5", "--noise-seed", "123"]
    whole = tmp_path / "whole"
    with pytest.warns(UserWarning):
        assert train_main(base_args(assets, whole, *steps)) == 0

    killed = tmp_path / "killed"
    proc = run_cli(base_args(assets, killed, *steps))
    latest = killed / "checkpoint" / "LATEST"
    deadline = time.time() + 900  # generous: start-up is slow on a loaded 2-core machine
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert latest.exists(), "the run wrote no checkpoint before the deadline"
    assert train_main(base_args(assets, killed, *steps, "--resume")) == 2  # a second writer, from another process
    assert f"is in use by another run (pid {proc.pid}" in capsys.readouterr().err
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    assert f"pid {proc.pid}" in (killed / ".lock").read_text()  # the kernel dropped the lock; its file stays
    with open(killed / "ledger.jsonl", "a") as f:  # a torn append, as if killed inside write()
        f.write('{"type": "step", "step": 9')

    resumed = run_cli(base_args(assets, killed, *steps, "--resume"))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "was left by a run that ended without releasing it" in err and not (killed / ".lock").exists()
    a = load_file(next((whole / "model").glob("*.safetensors")))
    b = load_file(next((killed / "model").glob("*.safetensors")))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ledger_a = (whole / "ledger.jsonl").read_text().splitlines()[1:]
    ledger_b = (killed / "ledger.jsonl").read_text().splitlines()[1:]
    assert ledger_a == ledger_b


BAD_INPUTS = [
    (["--epsilon", "-1"], "--epsilon"),
    (["--epsilon", "inf"], "--epsilon"),
    (["--delta", "1.5"], "--delta"),
    (["--num-directions", "0"], "--num-directions"),
    (["--clip", "0"], "--clip"),
    (["--zo-eps", "nan"], "--zo-eps"),
    (["--lr", "-0.1"], "--lr"),
    (["--sample-rate", "1.5", "--batch-size", "8"], "not both"),
    (["--method", "dpzero", "--num-directions", "4"], "dpzero"),
    (["--method", "sgd"], "--method"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_INPUTS)
def test_bad_flags_fail_cleanly(assets, tmp_path, refused, extra, needle):
    out = tmp_path / "run"
    refused([*base_args(assets, out), *extra], needle)
    assert not out.exists()


def test_bad_sample_rate_alone(assets, tmp_path, capsys):
    args = [a for a in base_args(assets, tmp_path / "r") if a not in ("--batch-size",)]
    args.remove("8")  # the batch size value
    assert train_main([*args, "--sample-rate", "0"]) == 2
    assert "--sample-rate" in capsys.readouterr().err


def test_missing_and_malformed_inputs(assets, tmp_path, refused):
    cases = []
    args = base_args(assets, tmp_path / "a")
    cases.append(([*args[:1], str(tmp_path / "nope"), *args[2:]], "nope"))  # missing model path
    cases.append(([*args[:1], "facebook/opt-125m", *args[2:]], "offline"))  # hub id offline
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(([*args[:5], str(empty), *args[6:]], "empty"))  # missing data
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "test"):
        (bad / f"{split}.csv").write_text("words,stars\nhello,1\n")
    cases.append(([*args[:5], str(bad), *args[6:]], "csv"))  # malformed data
    for argv, needle in cases:
        refused(argv, needle)
    assert not (tmp_path / "a").exists()


def test_resume_with_a_different_config_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(base_args(assets, out)) == 0
    capsys.readouterr()
    assert train_main([*base_args(assets, out), "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "lr" in err
    assert train_main(base_args(assets, out)) == 2  # no silent overwrite either
    assert "already holds a run" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback(assets, tmp_path):
    proc = run_cli([*base_args(assets, tmp_path / "r"), "--delta", "0"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err and err.strip().startswith("error:")


def test_torn_last_log_line_is_dropped_and_corruption_elsewhere_is_reported(tmp_path):
    from dpzo_engine.core.errors import ConfigError

    log = tmp_path / "ledger.jsonl"
    text = journal.write_lines([{"step": 1}, {"step": 2}, {"step": 3, "seeds": [1, 2]}])
    log.write_text(text[:-20])  # the last append cut short by a kill: no newline
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]
    lines = text.splitlines(keepends=True)
    log.write_text(lines[0] + lines[1].replace("2", "5", 1) + lines[2])  # still JSON, but changed
    with pytest.raises(ConfigError, match="line 2"):
        read_jsonl(log)
    log.write_text(lines[0] + lines[2])  # a line lost
    with pytest.raises(ConfigError, match="line 2"):
        read_jsonl(log)


def test_the_dpzo_train_command_names_itself(capsys, monkeypatch):
    """``dpzo-train --help`` (setup.py's console script) shows ``dpzo-train``, not ``python -m``."""
    from dpzo_engine.train import console

    monkeypatch.setattr(sys, "argv", ["dpzo-train", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        console()
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: dpzo-train ")
