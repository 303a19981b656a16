"""bench/gpu_check.py: the CPU dry run of `make gpu-check` end to end, so the GPU command cannot rot
between the rare sessions that hold a GPU; and its pieces that the dry run cannot reach (a part cut
off at its cap, the budget skip, failing tests counted, running from a checkout that is not installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def load_gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu_check", BENCH / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def gc():
    module = load_gpu_check()
    yield module
    sys.modules.pop("bench_gpu_check", None)


def test_make_gpu_check_dry_run(tmp_path):
    """`make gpu-check ARGS=--dry-run`: every part runs its real code path at tiny sizes on the CPU and
    the report carries every target of the issue, unjudged where it is a GPU speed or memory figure."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny sizes: threads only add contention
    args = f"--dry-run --out-dir {tmp_path}"
    cmd = ["make", "-s", "-C", str(REPO), "gpu-check", f"GPU_PY={sys.executable}", f"ARGS={args}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out,) = tmp_path.glob("gpu_check_cpu-*_dry-run.json")
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["device"] == "cpu" and report["broken_parts"] == []
    assert report["environment"]["versions"]["torch"] == importlib.metadata.version("torch")
    parts = report["parts"]
    assert list(parts) == ["tests", "kernels", "step", "memory", "clip"]
    assert {p["status"] for p in parts.values()} == {"ok"}, {n: p.get("reason") for n, p in parts.items()}

    counts = parts["tests"]["results"]["counts"]  # every CUDA variant collected, and skipped without CUDA
    assert counts["skipped"] > 50 and counts["passed"] == counts["failed"] == counts["error"] == 0

    kern = parts["kernels"]["results"]
    timed = {(r["kind"], r["J"]) for r in kern["apply"] if r["time_ms"] > 0 and r["ratio_to_copy"] > 0}
    assert timed == {(k, j) for k in ("gaussian", "rademacher") for j in (1, 2, 65)}
    assert {f["kind"] for f in kern["fused_vs_unfused"]} == {"gaussian", "rademacher"}
    assert kern["mezo"]["mezo_ms"] > 0 and kern["mezo"]["speedup_gaussian"] > 0

    step = {r["implementation"]: r for r in parts["step"]["results"]["rows"]}
    assert set(step) == {"ours-central", "ours-forward", "mezo-style"}
    k = step["ours-central"]["K"]
    assert step["ours-central"]["forwards_per_step"] == 2 * k and step["ours-forward"]["forwards_per_step"] == k + 1

    cells = {c["method"]: c for c in parts["memory"]["results"]["cells"]}
    assert set(cells) == {"inference", "dp-aggzo-k2", "dp-aggzo-k4", "dp-adamw"}
    assert all(c["status"] == "ok" and c["cpu_max_rss_bytes"] > 0 for c in cells.values())  # fresh processes
    assert cells["dp-adamw"]["first_order"]["opacus_mode"] == "ghost"

    clip = parts["clip"]["results"]
    assert clip["B"] == 64 and clip["K"] == 256 and clip["agrees"] and clip["num_nonfinite"] == 1

    verdicts = {(t["part"], t["name"]): t["pass"] for t in report["targets"]}
    names = " / ".join(n for _, n in verdicts)
    for needle in (
        "pytest -m gpu", "rademacher J=1 vs copy", "gaussian J=1 vs copy", "gaussian fused J=2",
        "rademacher fused J=2", "vs MeZO-style", "(central differences)", "(forward differences)",
        "outside the forward passes", "DP-AggZO peak", "DP-AggZO / inference-only forward", "DP-AdamW",
        "largest K / smallest K", "clip_aggregate [64, 256]",
    ):  # fmt: skip
        assert needle in names, needle
    judged = {name: ok for (_, name), ok in verdicts.items() if ok is not None}
    assert judged == {  # only code-path and correctness targets are judged without a GPU
        "every kernel case ran": True,
        "every cell gave a result": True,
        "clip_aggregate [64, 256] (triton) agrees with the reference": True,
    }
    assert report["summary"] == {"PASS": 3, "FAIL": 0, "n/a": len(verdicts) - 3}

    md = out.with_suffix(".md").read_text()
    assert md.startswith("# GPU check (CPU dry run")
    assert md.count("| n/a") == len(verdicts) - 3 and md.count("| PASS |") == 3
    for section in ("## Verdicts", "## Parts", "### tests", "### kernels", "### step", "### memory", "### clip"):
        assert section in md
    assert "\\|clipped terms\\|" in md  # a pipe inside a cell is escaped
    assert "3 PASS, 0 FAIL" in proc.stdout


def test_part_past_its_cap_is_killed_with_its_children(gc, tmp_path):
    """The hard cap: the whole process group goes, grandchildren included, and the call returns."""
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
    )
    start = time.time()
    code, tail = gc.run_process([sys.executable, "-c", script], 3.0, dict(os.environ), "t")
    assert code is None and time.time() - start < 20 and tail == ["started"]
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
    time.sleep(0.5)
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"  # gone, or dead and unreaped


def test_part_that_would_not_fit_is_skipped_with_its_reason(gc, tmp_path):
    code = gc.main(["--dry-run", "--parts", "clip", "--budget", "6", "--out-dir", str(tmp_path)])
    (out,) = tmp_path.glob("*.json")
    report = json.loads(out.read_text())
    clip = report["parts"]["clip"]
    assert clip["status"] == "skipped" and clip["reason"].startswith("budget:")
    assert report["targets"] == [
        {
            "part": "clip",
            "name": "no figures",
            "measured": None,
            "threshold": None,
            "rule": clip["reason"],
            "pass": None,
        }
    ]
    assert code == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parts", "kernels,nope"], "unknown part(s) nope"),
        (["--budget", "0"], "--budget must be a positive number"),
        pytest.param(
            [],
            "no CUDA device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA"),
        ),
    ],
)
def test_bad_input_is_one_error_line(gc, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        gc.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_failing_tests_are_counted_from_the_outcome_log(tmp_path):
    """The plugin behind the tests part: one line per test, failures with their last message line."""
    (tmp_path / "test_mixed.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'boom'\n"
        "def test_skip(): pytest.skip('no')\n"
        "@pytest.mark.xfail\ndef test_xf(): assert 0\n"
        "@pytest.fixture\ndef broken(): raise RuntimeError('setup broke')\n"
        "def test_err(broken): pass\n"
    )
    log = tmp_path / "log.jsonl"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_outcomes"]
    cmd += ["--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_mixed.py")]
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTEST_OUTCOMES_LOG=str(log)), capture_output=True, timeout=120)
    lines = {x["test"].split("::")[1]: x for x in map(json.loads, log.read_text().splitlines())}
    assert {k: v["outcome"] for k, v in lines.items()} == {
        "test_ok": "passed",
        "test_bad": "failed",
        "test_skip": "skipped",
        "test_xf": "xfailed",
        "test_err": "error",
    }
    assert "boom" in lines["test_bad"]["message"] and "setup broke" in lines["test_err"]["message"]


def test_engine_imports_from_this_checkout_when_not_installed(gc, monkeypatch):
    """The GPU machine has no install of the package: symlinks give its three import names."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert gc.use_this_checkout() is None  # installed from this checkout (make install): nothing to do

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("dpzo_") else real_find_spec(name, *a)
    )
    links = Path(gc.use_this_checkout())
    assert sys.path[0] == str(links) and os.environ["PYTHONPATH"] == f"{links}{os.pathsep}/elsewhere"
    assert (links / "dpzo_triton").resolve() == (REPO / "kernels").resolve()
    assert (links / "dpzo_csrc" / "dpzo_cpu.cpp").exists() and (links / "dpzo_engine" / "ops").is_dir()


def test_failed_cases_are_grouped_by_error(gc):
    assert gc.ran("every case ran", [])["pass"] is True
    t = gc.ran("every case ran", [("gaussian J=1", "E: boom"), ("rademacher J=1", "E: boom"), ("J=65", "F: other")])
    assert t["pass"] is False and t["measured"] == "gaussian J=1, rademacher J=1: E: boom; J=65: F: other"
