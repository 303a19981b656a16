"""The run directory protocol (docs/run-directory.md): one writer, checks before any write, damage refused by
name, divergence stopped, leftovers removed, signals checkpointed. Issue 12's reproductions, on the tiny BERT.

Most cases run the trainer in-process against copies of one finished run (a refused resume fails before the
model loads, so each costs a fraction of a second). Subprocesses only where a real second process, an
import-time Ctrl-C or a mount namespace (full disk, read-only file system) is the point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpzo_engine.core.errors import RunDirError
from dpzo_engine.replay import compare_with_saved, same_bits
from dpzo_engine.replay import main as replay_main
from dpzo_engine.run import integrity, journal
from dpzo_engine.run.lock import RunLock
from dpzo_engine.run.run_dir import RunDir
from dpzo_engine.train import main as train_main
from dpzo_engine.zo.private_zo import PrivateZO

pytestmark = pytest.mark.usefixtures("one_thread")

A = ["--steps", "12", "-K", "4", "--batch-size", "8", "--save-every", "4", "--max-eval-examples", "16"]


def args(assets, out: Path, *extra: str) -> list[str]:
    model_dir, data_dir = assets
    return [
        "--model", str(model_dir), "--task", "local", "--data-dir", str(data_dir), "--max-length", "16",
        *A, "--output-dir", str(out), *extra,
    ]  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory) -> Path:
    """One complete run (checkpoint at step 8), copied by the tests that damage or resume it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that resume it (one_thread): the same float reductions, bit for bit
    try:
        assert train_main(args(assets, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ----------------------------------------------------------------------------- what a run leaves


def test_a_finished_run_is_complete_and_checkable(finished):
    assert not (finished / ".lock").exists() and not list(finished.rglob(".tmp*"))
    assert [p.name for p in (finished / "checkpoint").iterdir() if p.is_dir()] == ["step-0000008"]
    ckpt = finished / "checkpoint" / "step-0000008"
    assert (finished / "secret.key").stat().st_mode & 0o777 == 0o600
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 8 and set(manifest["files"]) == {"state.pt"}
    for name in ("config.json", "summary.json", "checkpoint/step-0000008/manifest.json"):
        strict_json((finished / name).read_text())
    for name in ("ledger.jsonl", "metrics.jsonl"):
        for line in (finished / name).read_text().splitlines():
            strict_json(line)
    state = integrity.verify(RunDir(finished))
    assert state.last_step == 12 and state.checkpoint.step == 8
    assert state.header["config_sha256"] == integrity.config_digest((finished / "config.json").read_text())
    assert (finished / "model" / "SHA256SUMS").exists()
    assert replay_main([str(finished), "--verify"]) == 0


# ----------------------------------------------------------------------------- damage


def _rewrite_line(path: Path, number: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[number - 1]
    lines[number - 1] = lines[number - 1].replace(old, new, 1)
    path.write_text("".join(lines))


def _extra_key(path: Path) -> None:
    data = json.loads(path.read_text())
    data["foo"] = 1
    path.write_text(json.dumps(data))


def _change_clip(run: Path) -> None:
    data = json.loads((run / "config.json").read_text())
    data["clip"] = 2.0
    (run / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _steps_not_a_number(run: Path) -> None:
    data = json.loads((run / "config.json").read_text())
    data["steps"] = "twelve"
    (run / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _drop_line(path: Path, number: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: number - 1] + lines[number:]))


def _keep_lines(path: Path, count: int) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:count]))


def _append_second_header(path: Path) -> None:
    log = journal.read(path)
    with open(path, "a") as f:
        f.write(journal.chained_line(log.rows[0], log.chain)[0])


DAMAGE = {
    "ledger removed": (lambda r: (r / "ledger.jsonl").unlink(), "ledger.jsonl is missing"),
    "LATEST names a missing checkpoint": (
        lambda r: (r / "checkpoint" / "LATEST").write_text("step-0000004\n"),
        "LATEST names step-0000004, which is missing",
    ),
    "truncated state.pt": (
        lambda r: (p := r / "checkpoint/step-0000008/state.pt").write_bytes(p.read_bytes()[:3000]),
        "step-0000008/state.pt is damaged",
    ),
    "state.pt of the right size, other bytes": (
        lambda r: (p := r / "checkpoint/step-0000008/state.pt").write_bytes(os.urandom(p.stat().st_size)),
        "step-0000008/state.pt is damaged (its sha256",
    ),
    "garbage secret.key": (lambda r: (r / "secret.key").write_bytes(os.urandom(80)), "secret.key"),
    "config.json not JSON": (lambda r: (r / "config.json").write_text("{not json"), "config.json could not be read"),
    "config.json with an extra key": (lambda r: _extra_key(r / "config.json"), "config.json: unknown key 'foo'"),
    "config.json value changed": (_change_clip, "config.json does not match the ledger header"),
    "config.json value of a wrong type": (_steps_not_a_number, "config.json: steps"),
    "ledger line 4 changed": (
        lambda r: _rewrite_line(r / "ledger.jsonl", 4, '"lr": 0.05', '"lr": 0.06'),
        "ledger.jsonl line 4 is damaged",
    ),
    "ledger line 6 lost": (lambda r: _drop_line(r / "ledger.jsonl", 6), "ledger.jsonl line 6 is damaged"),
    "ledger lines after the checkpoint's lost": (
        lambda r: _keep_lines(r / "ledger.jsonl", 5),
        "ledger.jsonl has 5 lines, but the checkpoint was taken after line 9",
    ),
    "second header": (lambda r: _append_second_header(r / "ledger.jsonl"), "ledger.jsonl line 14 is a second header"),
    "metrics line changed": (
        lambda r: _rewrite_line(r / "metrics.jsonl", 1, '"split": "test"', '"split": "dev"'),
        "metrics.jsonl line 1 is damaged",
    ),
    "manifest removed": (lambda r: (r / "checkpoint/step-0000008/manifest.json").unlink(), "manifest.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_refused_by_name_and_nothing_is_edited(assets, finished, tmp_path, capsys, damage):
    run = copy_of(finished, tmp_path)
    apply, needle = DAMAGE[damage]
    apply(run)
    before = snapshot(run)
    assert train_main(args(assets, run, "--resume")) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and needle in err[0], err
    assert snapshot(run) == before  # the refused resume truncated, removed and created nothing


def test_a_ledger_rewritten_without_its_chain_is_refused(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    rows = journal.read(run / "ledger.jsonl").rows
    rows[3]["released"][0] += 1e-9  # a plausible edit to a released value, re-serialised without its chain
    (run / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RunDirError, match="line 1 is damaged"):
        integrity.verify(RunDir(run))


# ----------------------------------------------------------------------------- resume and clean-up


def test_resume_removes_leftovers_and_continues(assets, finished, tmp_path, capsys):
    """What kills leave: a torn ledger line, a half-written model and checkpoint, a stale checkpoint with its
    manifest (a kill between the LATEST update and the clean-up), temporary files of atomic writes."""
    run = copy_of(finished, tmp_path)
    shutil.copytree(run / "checkpoint" / "step-0000008", run / "checkpoint" / "step-0000004")
    (run / "model" / ".tmp1a2b3c").write_bytes(b"\0" * 4096)  # safetensors' own temporary, by older versions
    (run / ".tmp.model.999").mkdir()
    (run / ".tmp.model.999" / "model.safetensors").write_bytes(b"\0" * 4096)
    (run / "checkpoint" / ".tmp.step-0000012.999").mkdir()
    (run / ".tmp.summary.json.999").write_text("{")
    (run / "metrics.jsonl.tmp").write_text("")  # the temporary name of earlier versions
    (run / "notes.tmp").write_text("the user's own file")  # not ours: kept
    with open(run / "ledger.jsonl", "a") as f:
        f.write('{"type": "step", "step": 13, "se')  # a torn append
    assert train_main(args(assets, run, "--resume")) == 0
    assert "resuming" in capsys.readouterr().err
    leftovers = [p.name for p in run.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    assert leftovers == ["notes.tmp"] and not (run / "checkpoint" / "step-0000004").exists()
    for x, y in zip(journal.read(run / "ledger.jsonl").rows, journal.read(finished / "ledger.jsonl").rows):
        assert x == y, {k: (x[k], y[k]) for k in x if x[k] != y.get(k)}
    assert integrity.verify(RunDir(run)).last_step == 12
    assert replay_main([str(run), "--verify"]) == 0


def test_resume_refuses_a_changed_base_model(assets, tmp_path, capsys):
    from safetensors.torch import save_file

    model_dir = tmp_path / "model"
    shutil.copytree(assets[0], model_dir)
    run = tmp_path / "run"
    assert train_main(args((model_dir, assets[1]), run)) == 0
    weights = load_file(model_dir / "model.safetensors")
    weights["bert.pooler.dense.bias"] += 1.0  # the model files change under the run
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(run)
    assert train_main(args((model_dir, assets[1]), run, "--resume")) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "starting weights differ" in err[0]
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- before anything is written


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading the data or the model fail loudly: a check that passes it came too late."""

    def boom(*a, **k):
        raise AssertionError("loaded data or model before the check")

    monkeypatch.setattr("dpzo_engine.run.session.get_task", boom)
    monkeypatch.setattr("dpzo_engine.run.session.build_model", boom)


def _refused_early(assets, tmp_path, capsys, argv, needle):
    assert train_main(argv) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and needle in err[0], err


def test_output_dir_problems_are_found_before_anything_loads(assets, tmp_path, capsys, no_loading):
    file = tmp_path / "file"
    file.write_text("not a directory")
    _refused_early(assets, tmp_path, capsys, args(assets, file), "is a file")
    _refused_early(assets, tmp_path, capsys, args(assets, file / "sub" / "run"), f"is below {file}, which is a file")
    _refused_early(assets, tmp_path, capsys, args(assets, tmp_path / "nowhere", "--resume"), "holds no run")
    assert file.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    if os.geteuid() != 0:  # root writes anywhere; the namespace test covers a read-only mount
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _refused_early(assets, tmp_path, capsys, args(assets, ro / "run"), "is not writable")


BAD_LIMITS = [
    (["--steps", "1000000000000"], "--steps must be at most"),
    (["--max-eval-examples", "-3"], "--max-eval-examples"),
    (["--max-eval-examples", "0"], "--max-eval-examples"),
    (["--max-weight-growth", "0.5"], "--max-weight-growth"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_LIMITS)
def test_limits_are_refused_up_front(assets, tmp_path, capsys, no_loading, extra, needle):
    _refused_early(assets, tmp_path, capsys, args(assets, tmp_path / "run", *extra), needle)
    assert not (tmp_path / "run").exists()


def test_lengths_are_checked_against_the_models_positions_before_its_weights_load(
    assets, tmp_path, capsys, monkeypatch
):
    def boom(*a, **k):
        raise AssertionError("weights loaded before the length check")

    monkeypatch.setattr("dpzo_engine.run.session.build_model", boom)
    _refused_early(assets, tmp_path, capsys, args(assets, tmp_path / "run", "--max-length", "200"), "128 positions")
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    # the task's default (128 for local files) is capped at a shorter model's positions, with a note
    from transformers import AutoTokenizer

    from dpzo_engine.models.loading import build_random_model

    short = tmp_path / "short-bert"
    tokenizer = AutoTokenizer.from_pretrained(assets[0])
    model = build_random_model("bert", "tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=32)
    model.save_pretrained(short)
    tokenizer.save_pretrained(short)
    argv = args((short, assets[1]), tmp_path / "capped", "--steps", "2")
    del argv[argv.index("--max-length") : argv.index("--max-length") + 2]
    assert train_main(argv) == 0
    assert "using --max-length 32" in capsys.readouterr().err
    assert journal.read(tmp_path / "capped" / "ledger.jsonl").rows[0]["max_length"] == 32


def test_perturbation_that_would_lose_the_weights_is_refused(assets, tmp_path, capsys):
    _refused_early(assets, tmp_path, capsys, args(assets, tmp_path / "run", "--zo-eps", "1e30", "--lr", "1e-30"),
                   "--zo-eps 1e+30 is too large")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_run_that_needs_more_space_than_is_free_is_refused(assets, tmp_path, capsys, monkeypatch):
    import shutil as sh

    free = sh.disk_usage(tmp_path)._replace(free=1 << 20)
    monkeypatch.setattr("dpzo_engine.run.preflight.shutil.disk_usage", lambda p: free)
    _refused_early(assets, tmp_path, capsys, args(assets, tmp_path / "run"), "not enough free space")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_set_up_is_one_line_and_leaves_nothing(assets, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("dpzo_engine.run.session.build_model", interrupted)
    assert train_main(args(assets, tmp_path / "run")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted (Ctrl-C) during set-up; nothing was written"]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(assets, finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    other = RunLock(run)  # another process's lock: a second open file description conflicts like one
    other.acquire()
    try:
        for extra in ([], ["--resume"]):
            before = snapshot(run)
            assert train_main(args(assets, run, *extra)) == 2
            err = error_lines(capsys)
            assert len(err) == 1 and f"{run} is in use by another run (pid {os.getpid()}" in err[0]
            assert snapshot(run) == before
    finally:
        os.close(other.fd)  # as if that process died: the kernel drops the lock, the file stays
    assert "pid" in (run / ".lock").read_text()
    assert train_main(args(assets, run, "--resume")) == 0
    assert "was left by a run that ended without releasing it" in capsys.readouterr().err
    assert not (run / ".lock").exists()


# ----------------------------------------------------------------------------- divergence


def test_lr_1e39_stops_before_anything_non_finite_is_saved(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(args(assets, out, "--lr", "1e39")) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "training diverged at step 1" in err[0]
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert len(journal.read(out / "ledger.jsonl").rows) == 1  # the header: step 1 was not recorded


def test_divergence_keeps_the_last_good_checkpoint_and_a_resume_can_continue(assets, tmp_path, capsys, monkeypatch):
    """θ turns non-finite in step 6 (here by hand): the ledger ends at step 5, the checkpoint at step 4
    stays intact and verifies, and a resume (once the cause is gone) completes the run."""
    step = PrivateZO.step

    def poisoned(self, *a, **k):
        if self.steps_done == 5:
            self.flat.buffers[0][3] = float("nan")
        return step(self, *a, **k)

    out = tmp_path / "run"
    monkeypatch.setattr(PrivateZO, "step", poisoned)
    assert train_main(args(assets, out)) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "diverged at step 6: the weights are no longer finite" in err[0]
    state = integrity.verify(RunDir(out))
    assert state.last_step == 5 and state.checkpoint.step == 4
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    monkeypatch.setattr(PrivateZO, "step", step)
    assert train_main(args(assets, out, "--resume")) == 0
    assert integrity.verify(RunDir(out)).last_step == 12


def test_weights_leaving_the_band_stop_the_run(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(args(assets, out, "--lr", "1e6")) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "rms grew to" in err[0] and "--max-weight-growth" in err[0]


def test_summary_and_metrics_are_strict_json(tmp_path):
    run = RunDir(tmp_path)
    run.write_summary({"accuracy": float("nan"), "loss": [1.0, float("inf")], "ok": 1})
    assert strict_json(run.summary_path.read_text()) == {"accuracy": None, "loss": [1.0, None], "ok": 1}
    run.log_metrics({"step": 1, "loss": float("nan")})
    assert journal.read(run.metrics_path).rows == [{"step": 1, "loss": None}]


def test_replay_compares_nan_models_bit_for_bit(tmp_path):
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert same_bits(a, a.clone()) and not torch.equal(a, a.clone())
    assert not same_bits(a, torch.tensor([1.0, float("nan"), 3.5]))
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    assert compare_with_saved(model.state_dict(), tmp_path) == (0, 2)


# ----------------------------------------------------------------------------- signals


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(assets, tmp_path, capsys, monkeypatch):
    """SIGTERM in step 6 (sent by the step itself, to this process): the step completes, a checkpoint at step 6
    is written, exit 143 with one line; the resumed run equals an uninterrupted one (--noise-seed)."""
    seed = ("--noise-seed", "7")
    whole = tmp_path / "whole"
    with pytest.warns(UserWarning):
        assert train_main(args(assets, whole, *seed)) == 0
    step = PrivateZO.step

    def terminated(self, *a, **k):
        if self.steps_done == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *a, **k)

    cut = tmp_path / "cut"
    monkeypatch.setattr(PrivateZO, "step", terminated)
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert train_main(args(assets, cut, *seed)) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM); checkpoint saved at step 6; resume with:")
    assert (cut / "checkpoint" / "LATEST").read_text().strip() == "step-0000006"
    assert integrity.verify(RunDir(cut)).last_step == 6
    monkeypatch.setattr(PrivateZO, "step", step)
    with pytest.warns(UserWarning):
        assert train_main(args(assets, cut, *seed, "--resume")) == 0
    a, b = load_file(whole / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "ledger.jsonl").read_text().splitlines()[1:] == (cut / "ledger.jsonl").read_text().splitlines()[1:]


def test_ctrl_c_while_python_imports_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpzo_engine.train", "--output-dir", str(tmp_path / "run")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # importing torch and transformers takes several seconds
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted"), err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the disk itself (namespaces)


def _namespace_available() -> str | None:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "needs Linux with unshare(1)"
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return None if probe.returncode == 0 else "unprivileged user and mount namespaces are not available here"


@pytest.mark.skipif(_namespace_available() is not None, reason=str(_namespace_available()))
def test_full_disk_and_read_only_mounts(assets, tmp_path):
    """A 12 MiB tmpfs in a private mount namespace: a run whose disk fills after its first checkpoint ends with
    one line and leaves no temporary file, a resume while it is full is refused up front, a resume after space
    is freed continues from the checkpoint; a read-only mount is refused before anything loads."""
    mount = tmp_path / "fs"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o size=12m tmpfs {mount} && exec {sys.executable} {__file__} {mount} {assets[0]} {assets[1]}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    code, lines = result["filled"]
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0], lines
    assert "--resume" in lines[0] and result["traceback"] is False
    assert result["latest"] == "step-0000004" and result["leftovers"] == []
    code, lines = result["resume_while_full"]
    assert code == 2 and "not enough free space" in lines[-1]
    code, lines = result["resume_after_freeing"]
    assert code == 0 and "resuming" in lines[-1] and "at step 4" in lines[-1]
    assert result["steps"] == 40 and result["verified_last_step"] == 40  # (a row cut mid-release adds a void row)
    code, lines = result["read_only"]
    assert code == 2 and "read-only file system" in lines[-1]


def _full_disk_scenario(fs: Path, model_dir: str, data_dir: str) -> dict:
    """Runs inside the namespace (see the test above) and prints one JSON line of observations. Only the run
    stopped while the disk fills is a subprocess; the rest call the trainer in this process."""
    import contextlib
    import io

    torch.set_num_threads(1)
    out = fs / "run"
    argv = [
        "--model", model_dir, "--task", "local", "--data-dir", data_dir, "--max-length", "16", "--steps", "40",
        "-K", "4", "--batch-size", "8", "--save-every", "4", "--max-eval-examples", "16", "--output-dir", str(out),
    ]  # fmt: skip

    def run(*extra) -> tuple[int, list[str]]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = train_main([*argv, *extra])
        return code, [line for line in err.getvalue().splitlines() if line.startswith(("error", "resuming"))]

    result = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dpzo_engine.train", *argv]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    while not (out / "checkpoint" / "LATEST").exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)  # fill the disk between two of its writes
    with open(fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate()
    result["filled"] = (proc.returncode, [line for line in err.splitlines() if line.startswith("error")])
    result["traceback"] = "Traceback" in err
    result["latest"] = (out / "checkpoint" / "LATEST").read_text().strip()
    result["leftovers"] = [str(p) for p in out.rglob(".tmp*")]
    result["resume_while_full"] = run("--resume")
    (fs / "filler").unlink()
    result["resume_after_freeing"] = run("--resume")
    result["steps"] = sum(r["type"] == "step" for r in journal.read(out / "ledger.jsonl").rows)
    result["verified_last_step"] = integrity.verify(RunDir(out)).last_step
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    argv[-1] += "-new"  # a fresh run on the now read-only file system
    result["read_only"] = run()
    print(json.dumps(result))
    return result


if __name__ == "__main__":  # the namespace half of test_full_disk_and_read_only_mounts
    _full_disk_scenario(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
