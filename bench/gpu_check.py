"""Every GPU claim in one prepared command: ``make gpu-check``, at most 8 minutes on one H100/H200.

GPU machines come rarely and briefly, without network, so the whole GPU verdict comes from this
one command. It runs five parts, most valuable first, each in its own process with its own time
cap under one hard budget (default 480 s); a part that would not fit in what is left is skipped
with the reason recorded:

1. ``tests``:   the CUDA test variants (``pytest -m gpu``: compiled Triton against the reference), as counts;
2. ``kernels``: ``apply_directions`` Gaussian and Rademacher, J = 1, 2, 65, on bf16 buffers of 1e8 and
                2e9 elements, as a ratio to a device copy of the same buffer; fused J = 2 against two
                J = 1 passes; one pass against the MeZO-style loop on OPT-1.3B's shapes (``kernels.py``);
3. ``step``:    one DP-AggZO step on random-init OPT-1.3B in bf16 (K = 16, batch 16, 256 tokens), ours
                (central and forward differences) against the MeZO-style implementation, and the share
                of our step outside the forwards (``step_time.py``);
4. ``memory``:  peak ``torch.cuda.max_memory_allocated`` on random-init OPT-6.7B in bf16, SST-2 batch, one
                fresh process per cell: inference forward, DP-AggZO K = 16 and 64, DP-AdamW (Opacus);
                an OOM is a result (``memory_vs_dpadam.py``);
5. ``clip``:    ``clip_aggregate`` on [64, 256]: agreement with the reference and time (``kernels.py``).

Writes ``gpu_check_<device>.json`` and ``.md`` (device, versions, every figure, a PASS/FAIL line per
target) to ``bench/results/`` or ``--out-dir``. Exit status 0 when no target failed and no part broke.

``--dry-run`` runs the same parts on the CPU at tiny sizes (Triton under its interpreter, CUDA
tests skipped, timing and memory targets not judged), in about a minute: the test suite runs
it on every CI so this command cannot rot. It runs from a checkout without installing the package
(the GPU machine's own Python, with prv-accountant and Opacus carried as wheels: README).

    python bench/gpu_check.py                  # on the GPU machine
    python bench/gpu_check.py --dry-run --out-dir /tmp/gc
    python bench/gpu_check.py --parts kernels,clip --budget 120
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS_DIR = BENCH / "results"
BUDGET_S = 480.0  # the hard budget: 8 minutes wall on one GPU
DRY_CAP_FACTOR = 2.0  # the dry run's caps: a busy 2-core CI machine interprets Triton, the budget stays the same
REPORT_RESERVE_S = 5.0  # kept back for writing the report
KILL_GRACE_S = 3.0  # a worker past its deadline gets this long to write what it has


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float  # the most this part may take
    min_s: float  # below this much time left it is skipped: it could not produce a figure
    what: str


PARTS = (
    Part("tests", 150, 20, "pytest -m gpu (compiled Triton kernels against the reference), as counts"),
    Part("kernels", 70, 25, "apply_directions vs a device copy (J = 1, 2, 65), fused J = 2, vs the MeZO-style loop"),
    Part("step", 90, 40, "one DP-AggZO step on OPT-1.3B: ours (central, forward) vs MeZO-style; non-forward share"),
    Part("memory", 150, 45, "peak memory on OPT-6.7B: inference, DP-AggZO K = 16 and 64, DP-AdamW; fresh process each"),
    Part("clip", 20, 8, "clip_aggregate on [64, 256]: agreement with the reference, time"),
)
PART_NAMES = tuple(p.name for p in PARTS)

# What each part measures, on the GPU and in the CPU dry run (tiny sizes, same code paths).
GPU_SPEC = {
    "kernels": {
        "sizes": [100_000_000, 2_000_000_000],
        "directions": [1, 2, 65],
        "backend": "triton",
        "shapes": "opt-1.3b",
    },
    "step": {"model": "opt-1.3b", "directions": [16], "batch": 16, "length": 256, "reps": 3, "dtype": "bfloat16"},
    "memory": {
        "model": "opt-6.7b",
        "setting": "sst2",
        "directions": [16, 64],
        "dtype": "bfloat16",
        "steps": 2,
        "batch": None,
        "length": None,
        "cell_cap_s": 90,
    },
    "clip": {"B": 64, "K": 256, "backend": "triton"},
}
DRY_SPEC = {
    "kernels": {"sizes": [4099], "directions": [1, 2, 65], "backend": "triton", "shapes": "tiny"},
    "step": {"model": "opt-small", "directions": [2], "batch": 2, "length": 8, "reps": 1, "dtype": "float32"},
    "memory": {
        "model": "opt-tiny",
        "setting": "sst2",
        "directions": [2, 4],
        "dtype": "float32",
        "steps": 1,
        "batch": 2,
        "length": 12,
        "cell_cap_s": 60,
    },
    "clip": {"B": 64, "K": 256, "backend": "triton"},
}
# A tiny OPT for the dry run's MeZO-style loop (the GPU run uses facebook/opt-1.3b's shapes).
TINY_OPT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=64,
    num_attention_heads=4,
    vocab_size=256,
    max_position_embeddings=64,
    word_embed_proj_dim=32,
    do_layer_norm_before=True,
)
OUTCOMES = ("ok", "oom", "skipped")  # memory cells: a figure, an OOM (a result), or a recorded skip
MIN_CELL_S = 15.0  # a memory cell with less time than this left is skipped (process start + model build)
PACKAGES = (
    "torch", "triton", "transformers", "accelerate", "opacus", "prv-accountant", "numpy", "scipy",
    "pytest", "safetensors", "tokenizers",
)  # fmt: skip
NEEDED_BY = {
    "prv_accountant": "the step and memory parts (dpzo_engine.privacy)",
    "opacus": "the DP-AdamW memory cell",
    "transformers": "the step and memory parts (models)",
    "triton": "the tests, kernels and clip parts",
    "pytest": "the tests part",
}


# ============================================================================ the engine from this checkout


def use_this_checkout() -> str | None:
    """Make ``dpzo_engine``, ``dpzo_triton`` (``kernels/``) and ``dpzo_csrc`` (``csrc/``) import from
    this checkout, for this process and its workers.

    Nothing to do when the package is installed from here (``make install``). On a machine where it
    is not (the GPU machine: its preinstalled Python, no venv), symlinks under a temporary folder
    give the three import names, and the folder goes first on ``PYTHONPATH``. Returns that folder.
    """
    layout = {"dpzo_engine": "dpzo_engine", "dpzo_triton": "kernels", "dpzo_csrc": "csrc"}

    def from_here(name: str, folder: str) -> bool:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return False
        origin = spec and spec.origin
        return bool(origin) and Path(origin).resolve().parent == (REPO / folder).resolve()

    if all(from_here(n, f) for n, f in layout.items()):
        return None
    links = Path(tempfile.mkdtemp(prefix="dpzo-checkout-"))
    atexit.register(shutil.rmtree, links, True)  # the workers have ended by then
    for name, folder in layout.items():
        (links / name).symlink_to(REPO / folder, target_is_directory=True)
    sys.path.insert(0, str(links))  # called before anything imports the engine
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(links), os.environ.get("PYTHONPATH")) if p)
    return str(links)


# ============================================================================ workers (one process per part)


def maybe_unjudged(targets: list[dict], dry: bool) -> list[dict]:
    """The dry run measures no speed or memory worth judging: there every such verdict is n/a."""
    return [{**t, "pass": None, "note": "dry run"} for t in targets] if dry else targets


def ran(name: str, failures: list[tuple[str, str]]) -> dict:
    """A code-path target, judged in the dry run too: every case ran (an OOM counts as a result).
    ``failures``: (case, error) pairs; cases with the same error are listed once with it."""
    by_error: dict[str, list[str]] = {}
    for case, error in failures:
        by_error.setdefault(error, []).append(case)
    return {
        "name": name,
        "measured": "; ".join(f"{', '.join(c)}: {e}" for e, c in by_error.items())[:800] if failures else "all",
        "threshold": 0,
        "rule": "no case raised an error",
        "pass": not failures,
    }


def kernels_part(spec: dict, dry: bool, device, save: Callable[[dict], None]) -> dict:
    import torch

    import kernels

    timer = kernels.Timer(device, reps=1 if dry else 3)  # CUDA: do_bench's own repetitions
    shapes = kernels.opt_shapes(TINY_OPT if spec["shapes"] == "tiny" else None)
    label = "tiny OPT (shapes only)" if spec["shapes"] == "tiny" else "facebook/opt-1.3b (shapes only)"
    rows, fused, mezo = [], [], {"model": label}

    def snapshot() -> dict:
        targets = kernels.gpu_targets(rows, fused, mezo)
        results = {"apply": rows, "fused_vs_unfused": fused, "mezo": mezo}
        failed = [(f"{r['kind']} J={r['J']} n={r['elements']}", r["error"]) for r in rows if "error" in r]
        failed += [(f"MeZO comparison, {k.removesuffix('_error')}", v) for k, v in mezo.items() if k.endswith("_error")]
        return {"results": results, "targets": [ran("every kernel case ran", failed), *maybe_unjudged(targets, dry)]}

    for n in spec["sizes"]:  # smallest first: a figure early, then the large buffer
        size_rows, size_fused = kernels.bench_apply_vs_copy(device, [n], spec["directions"], spec["backend"], timer)
        rows += size_rows
        fused += size_fused
        save(snapshot())
        if device.type == "cuda":
            torch.cuda.empty_cache()
    mezo = kernels.bench_mezo(device, spec["backend"], timer, shapes, model=label)
    out = snapshot()
    kernels.print_gpu(out["results"])
    return out


def clip_part(spec: dict, dry: bool, device, save: Callable[[dict], None]) -> dict:
    import kernels

    c = kernels.bench_clip_aggregate(device, spec["backend"], kernels.Timer(device), spec["B"], spec["K"])
    kernels.print_clip(c)
    agrees = c.get("agrees")
    target = {
        "name": f"clip_aggregate [{spec['B']}, {spec['K']}] ({spec['backend']}) agrees with the reference",
        "measured": c.get("max_sum_error_relative_to_terms", c.get("error")),
        "threshold": kernels.CLIP_SUM_TOLERANCE,
        "rule": "counts equal; sums within 1e-9 of the column's sum of |clipped terms|",
        "pass": bool(agrees),  # correctness: judged in the dry run too (the interpreter runs the kernel)
    }
    return {"results": c, "targets": [target]}


def step_part(spec: dict, dry: bool, device, save: Callable[[dict], None]) -> dict:
    import step_time
    import torch

    dtype = getattr(torch, spec["dtype"])
    model = step_time.bench_model(
        spec["model"], spec["directions"], spec["batch"], spec["length"], spec["reps"], device, dtype
    )
    step_time.print_table([model])
    return {"results": model, "targets": maybe_unjudged(step_time.evaluate_targets([model], gpu=not dry), dry)}


def memory_part(spec: dict, dry: bool, device, save: Callable[[dict], None], deadline: float) -> dict:
    import memory_vs_dpadam as mem

    methods = ["inference", *(f"dp-aggzo-k{k}" for k in spec["directions"]), "dp-adamw"]
    cells = mem.build_cells(
        device, [spec["model"]], [spec["setting"]], methods, spec["dtype"], spec["steps"], spec["batch"], spec["length"]
    )
    rows: list[dict] = []

    def snapshot() -> dict:
        targets = mem.evaluate_targets(
            rows, spec["directions"], spec.get("capacity_gib"), False, spec["model"], spec["setting"]
        )
        failed = [(r["method"], f"{r['status']}: {r.get('message', '')}") for r in rows if r["status"] not in OUTCOMES]
        return {
            "results": {"cells": rows},
            "targets": [ran("every cell gave a result", failed), *maybe_unjudged(targets, dry)],
        }

    for cell in cells:
        base = {"model": cell["model"], "setting": cell["setting"]["name"], "method": cell["method"]}
        left = deadline - time.time() - KILL_GRACE_S
        if cell["method"] == "dp-adamw" and importlib.util.find_spec("opacus") is None:
            row = {**base, "status": "skipped", "message": "opacus is not installed here (carry its wheel: README)"}
        elif left < MIN_CELL_S:
            row = {**base, "status": "skipped", "message": f"budget: {left:.0f} s left, a cell needs ~{MIN_CELL_S:.0f}"}
        else:
            row = mem.run_cell(cell, inline=False, timeout=min(spec["cell_cap_s"], left))
        rows.append(row)
        peak = row.get("peak_bytes")
        shown = f"{mem.gib(peak):.2f} GiB" if peak else f"max RSS {mem.gib(row.get('cpu_max_rss_bytes') or 0):.2f} GiB"
        print(f"{row['method']:>14}  {row['status']:>7}  {shown}  {row.get('message', '')}", flush=True)
        save(snapshot())
    return snapshot()


WORKERS = {"kernels": kernels_part, "clip": clip_part, "step": step_part, "memory": memory_part}


def worker_main(name: str, spec: dict, dry: bool, device_name: str, result_path: Path, deadline: float) -> None:
    """One part, in this process: writes ``{"status", "results", "targets"}`` to ``result_path``,
    after each finished piece too, so a part stopped at its cap keeps what it measured."""
    import torch

    def save(payload: dict, status: str = "partial") -> None:
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": status, **payload}, default=str))
        tmp.replace(result_path)

    torch.manual_seed(0)
    device = torch.device(device_name)
    kwargs = {"deadline": deadline} if name == "memory" else {}
    try:
        payload = WORKERS[name](spec, dry, device, save, **kwargs)
    except ModuleNotFoundError as exc:  # what the machine lacks, by name
        save({"reason": f"missing module {exc.name!r} ({type(exc).__name__}: {exc})"}, status="skipped")
        return
    save(payload, status="ok")


# ============================================================================ the orchestrator


def run_process(cmd: list[str], timeout: float, env: dict, prefix: str) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in its own process group, echoing its output with ``prefix``; kill the whole group
    at ``timeout``. Returns (exit code or None on timeout, the last output lines)."""
    tail: collections.deque[str] = collections.deque(maxlen=30)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"[{prefix}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=KILL_GRACE_S)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        code = None
    reader.join(timeout=5)
    return code, list(tail)


def tests_files() -> list[str]:
    """Test modules that carry the ``gpu`` marker (collecting only those keeps imports to what they need)."""
    return sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text("utf-8")
    )


def run_tests_part(timeout: float, env: dict, work: Path) -> dict:
    """``pytest -m gpu`` over the modules that have GPU variants; counts from a per-test log."""
    log = work / "pytest_outcomes.jsonl"
    files = tests_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider"]
    cmd += ["-p", "bench.pytest_outcomes", *files]  # `python -m pytest` runs from the checkout's root
    env = {**env, "PYTEST_OUTCOMES_LOG": str(log)}
    code, tail = run_process(cmd, timeout, env, "tests")
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    counts = collections.Counter(x["outcome"] for x in lines)
    results = {
        "command": "python -m pytest -m gpu " + " ".join(files),
        "exit_code": code,
        "counts": {k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")},
        "failures": [x for x in lines if x["outcome"] in ("failed", "error")][:30],
        "slowest": sorted(lines, key=lambda x: -x["seconds"])[:5],
    }
    if code is None:
        status, reason = "timeout", f"stopped at its cap ({timeout:.0f} s); counts so far"
    elif code in (0, 1) or lines:  # 1: some tests failed; still a result
        status, reason = "ok", None
    else:
        status, reason = "error", f"pytest exited {code} without running tests: {' | '.join(tail[-3:])}"
    return {"status": status, "reason": reason, "results": results}


def tests_targets(part: dict, dry: bool) -> list[dict]:
    c = (part.get("results") or {}).get("counts") or {}
    broken = c.get("failed", 0) + c.get("error", 0)
    measured = f"{c.get('passed', 0)} passed, {broken} failed or errors, {c.get('skipped', 0)} skipped" if c else None
    ok = None if dry or not c else bool(broken == 0 and c.get("passed", 0) > 0 and part["status"] == "ok")
    target = {
        "name": "CUDA test variants (pytest -m gpu)",
        "measured": measured,
        "threshold": 0,
        "rule": "all pass (none failed, none errored, at least one ran, not cut off)",
        "pass": ok,
    }
    return [{**target, "note": "dry run: CUDA variants are skipped without a GPU"} if dry else target]


def run_worker_part(part: Part, spec: dict, dry: bool, device: str, timeout: float, env: dict, work: Path) -> dict:
    result_path = work / f"{part.name}.json"
    deadline = time.time() + timeout
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part.name, "--spec", json.dumps(spec)]
    cmd += ["--device", device, "--result", str(result_path), "--deadline", str(deadline)]
    cmd += ["--dry-run"] if dry else []
    code, tail = run_process(cmd, timeout + KILL_GRACE_S, env, part.name)
    data = json.loads(result_path.read_text()) if result_path.exists() else {}
    if code is None:
        return {**data, "status": "timeout", "reason": f"stopped at its cap ({timeout:.0f} s); figures so far"}
    if code != 0 or data.get("status") not in ("ok", "skipped"):
        return {**data, "status": "error", "reason": f"exit {code}: {' | '.join(tail[-4:])}"[:1500]}
    return data


def environment(device: str, dry: bool, checkout_links: str | None) -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    missing = {m: why for m, why in NEEDED_BY.items() if importlib.util.find_spec(m) is None}
    info = {
        "python": platform.python_version(),
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "missing_modules": missing,
        "engine_from": f"this checkout through symlinks in {checkout_links}" if checkout_links else "installed package",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "git_commit": git_commit(),
    }
    if not dry:
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_gib": props.total_memory / (1 << 30),
            "multiprocessors": props.multi_processor_count,
            "driver": nvidia_driver(),
        }
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def device_label(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ============================================================================ report


def verdict(t: dict) -> str:
    return "n/a" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"


def shown(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def cell(x) -> str:
    """Text for a markdown table cell (a literal pipe would end the cell)."""
    return shown(x).replace("|", "\\|")


def markdown(report: dict) -> str:
    env, dry = report["environment"], report["dry_run"]
    gpu = env.get("gpu")
    title = "GPU check" + (" (CPU dry run: code paths only, no GPU figure)" if dry else f" on {gpu['name']}")
    v = env["versions"]
    lines = [
        f"# {title}",
        "",
        f"`{report['command']}`, {report['date']}, {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        "- device: "
        + (
            f"{gpu['name']}, {gpu['total_memory_gib']:.0f} GiB, sm {gpu['capability']}, driver {gpu['driver']}"
            if gpu
            else f"CPU: {env['cpu']} ({env['cpu_count']} cores, load {env['load_average'][0]:.1f})"
        ),
        f"- python {env['python']}, torch {v['torch']} (CUDA {env['torch_cuda']}), triton {v['triton']}, "
        f"transformers {v['transformers']}, accelerate {v['accelerate']}, opacus {v['opacus']}, "
        f"prv-accountant {v['prv-accountant']}",
        f"- engine: {env['engine_from']}; commit {env['git_commit'] or 'unknown'}",
    ]
    if env["missing_modules"]:
        lines.append("- missing here: " + "; ".join(f"`{m}` ({why})" for m, why in env["missing_modules"].items()))
    lines += ["", "## Verdicts", "", "| part | target | measured | rule | verdict |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(
            f"| {t['part']} | {cell(t['name'])} | {cell(t['measured'])} | {cell(t['rule'])} | {verdict(t)}{note} |"
        )
    s = report["summary"]
    lines += ["", f"**{s['PASS']} PASS, {s['FAIL']} FAIL, {s['n/a']} n/a.**", "", "## Parts", ""]
    lines += ["| part | status | seconds | cap s | reason |", "|---|---|---|---|---|"]
    for name, p in report["parts"].items():
        reason = cell(p.get("reason") or "")
        lines.append(f"| {name} | {p['status']} | {p.get('seconds', 0):.0f} | {p['cap_s']:.0f} | {reason} |")
    lines += part_tables(report["parts"])
    return "\n".join(lines) + "\n"


def part_tables(parts: dict) -> list[str]:
    out: list[str] = []
    tests = (parts.get("tests") or {}).get("results")
    if tests:
        c = tests["counts"]
        out += ["", "### tests", "", f"`{tests['command']}`: " + ", ".join(f"{v} {k}" for k, v in c.items() if v)]
        out += [f"- {f['outcome']}: `{f['test']}`: {f.get('message', '')}" for f in tests["failures"]]
    kern = (parts.get("kernels") or {}).get("results")
    if kern:
        out += [
            "",
            "### kernels",
            "",
            "| elements | kind | J | ms | GB/s | copy GB/s | vs copy |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in kern["apply"]:
            if "time_ms" in r:
                out.append(
                    f"| {r['elements']:.3g} | {r['kind']} | {r['J']} | {r['time_ms']:.3f} | {r['gb_per_s']:.0f} "
                    f"| {r['copy_gb_per_s']:.0f} | {r['ratio_to_copy']:.2f} |"
                )
            else:
                why = r.get("skipped") or r.get("error")
                out.append(f"| {r['elements']:.3g} | {r.get('kind', '')} | {r.get('J', '')} | {why} | | | |")
        for f in kern["fused_vs_unfused"]:
            out.append(
                f"\nfused J=2 vs two J=1 ({f['kind']}, {f['elements']:.3g}): {f['fused_J2_ms']:.3f} ms vs "
                f"{f['two_J1_ms']:.3f} ms, {f['speedup']:.2f}x"
            )
        m = kern["mezo"]
        if "mezo_ms" in m:
            out.append(
                f"\nMeZO-style loop over {m['tensors']} tensors of {m['model']} ({m['parameters']:.3g} parameters): "
                f"{m['mezo_ms']:.3f} ms; one fused pass: gaussian {shown(m.get('gaussian_J1_ms'))} ms "
                f"({shown(m.get('speedup_gaussian'))}x), rademacher {shown(m.get('rademacher_J1_ms'))} ms "
                f"({shown(m.get('speedup_rademacher'))}x)"
            )
        elif m.get("skipped"):
            out.append(f"\nMeZO-style loop: {m['skipped']}")
    step = (parts.get("step") or {}).get("results")
    if step:
        out += [
            "",
            "### step",
            "",
            f"{step['model']} ({step['parameters']:.3g} parameters), batch {step['batch']} x {step['length']} tokens; "
            f"gathered and full-vocabulary losses differ by {step['loss_max_abs_difference']:.2g}",
            "",
            "| K | implementation | step s | MeZO-style / this | outside forwards | forwards |",
            "|---|---|---|---|---|---|",
        ]
        for r in step["rows"]:
            out.append(
                f"| {r['K']} | {r['implementation']} | {r['step_s']:.4f} | {r['speedup_vs_mezo_style']:.2f}x "
                f"| {100 * r['outside_forward_share']:.1f}% | {r['forwards_per_step']} |"
            )
    mem = (parts.get("memory") or {}).get("results")
    if mem:
        out += ["", "### memory", "", "| model | method | status | peak GiB | note |", "|---|---|---|---|---|"]
        for r in mem["cells"]:
            peak = r.get("peak_bytes")
            if r["status"] != "ok":
                note = r.get("message", "")
            else:
                mode = (r.get("first_order") or {}).get("opacus_mode")
                rss = None if peak else f"max RSS {r['cpu_max_rss_bytes'] / (1 << 30):.2f} GiB (not GPU memory)"
                note = ", ".join(x for x in (mode and f"Opacus {mode}", rss) if x)
            out.append(
                f"| {r['model']} | {r['method']} | {r['status']} | {'-' if not peak else f'{peak / (1 << 30):.2f}'} "
                f"| {cell(note)} |"
            )
    clip = (parts.get("clip") or {}).get("results")
    if clip:
        out += ["", "### clip", ""]
        if "error" in clip:
            out.append(f"clip_aggregate [{clip['B']}, {clip['K']}]: {clip['error']}")
        else:
            out.append(
                f"clip_aggregate [{clip['B']}, {clip['K']}] ({clip['backend']}): {clip['time_us']:.1f} us, reference "
                f"{clip['reference_time_us']:.1f} us ({shown(clip['speedup_vs_reference'])}x); {clip['num_clipped']} "
                f"rows clipped, {clip['num_nonfinite']} non-finite; counts equal: {clip['counts_equal_to_reference']}; "
                f"max sum error {clip['max_sum_error_relative_to_terms']:.2g} of the terms"
            )
    return out


# ============================================================================ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, same code paths, no timing targets")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="hard wall budget in seconds [%(default)s]")
    p.add_argument("--parts", default=",".join(PART_NAMES), help="comma-separated subset, in this order [all]")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and markdown go [bench/results]")
    p.add_argument("--device", default="cuda", help="CUDA device [cuda]; the dry run uses the CPU")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if unknown := [s for s in parts if s not in PART_NAMES]:
        fail(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PART_NAMES)}")
    if not args.budget > 0:
        fail(f"--budget must be a positive number of seconds, got {args.budget}")
    links = use_this_checkout()
    import torch

    dry = args.dry_run
    if dry:
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            fail("no CUDA device here: run it on a GPU machine, or use --dry-run for the CPU check of the code paths")
        device = args.device
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")  # Triton on CPU tensors; no GPU even if one exists
    info = environment(device, dry, links)
    label = "cpu-" + device_label(info["cpu"]) + "_dry-run" if dry else device_label(info["gpu"]["name"])
    print(f"gpu-check on {info['gpu']['name'] if not dry else 'CPU (dry run)'}: budget {args.budget:.0f} s", flush=True)
    if info["missing_modules"]:
        print("missing here: " + "; ".join(f"{m} ({why})" for m, why in info["missing_modules"].items()), flush=True)
    deadline = started + args.budget - REPORT_RESERVE_S
    specs = DRY_SPEC if dry else GPU_SPEC
    report_parts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        for part in (p for p in PARTS if p.name in parts):
            left = deadline - time.time()
            cap = part.cap_s * (DRY_CAP_FACTOR if dry else 1.0)
            record: dict = {"what": part.what, "cap_s": cap}
            if left < part.min_s:
                report_parts[part.name] = {**record, "status": "skipped", "reason": f"budget: {left:.0f} s left, "
                                           f"needs at least {part.min_s:.0f}", "seconds": 0.0}  # fmt: skip
                print(f"--- {part.name}: skipped ({report_parts[part.name]['reason']})", flush=True)
                continue
            timeout = min(cap, left)
            print(f"--- {part.name} (cap {timeout:.0f} s): {part.what}", flush=True)
            t0 = time.time()
            if part.name == "tests":
                data = run_tests_part(timeout, env, work)
            else:
                spec = dict(specs[part.name])
                if part.name == "memory" and not dry:
                    spec["capacity_gib"] = info["gpu"]["total_memory_gib"]
                data = run_worker_part(part, spec, dry, device, timeout, env, work)
                data["spec"] = spec
            record.update(data, seconds=round(time.time() - t0, 1))
            record["targets"] = tests_targets(record, dry) if part.name == "tests" else record.get("targets") or []
            report_parts[part.name] = record
            print(f"--- {part.name}: {record['status']} in {record['seconds']:.0f} s", flush=True)

    targets = []
    for name, p in report_parts.items():
        ts = p.get("targets") or []
        if not ts:  # the part gave no figure: one line says why
            broke = p["status"] in ("error", "timeout")
            ts = [{"name": "no figures", "measured": None, "threshold": None, "rule": p.get("reason") or p["status"],
                   "pass": False if broke and not dry else None}]  # fmt: skip
        targets += [{"part": name, **t} for t in ts]
    summary = collections.Counter(verdict(t) for t in targets)
    broken = [n for n, p in report_parts.items() if p["status"] == "error"]
    report = {
        "check": "gpu_check",
        "command": "python bench/gpu_check.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry,
        "device": device,
        "budget_s": args.budget,
        "elapsed_s": round(time.time() - started, 1),
        "environment": info,
        "summary": {k: summary.get(k, 0) for k in ("PASS", "FAIL", "n/a")},
        "broken_parts": broken,
        "targets": targets,
        "parts": report_parts,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"gpu_check_{label}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print("\nverdicts:")
    for t in targets:
        print(f"  [{verdict(t):>4}] {t['part']}: {t['name']}: {shown(t['measured'])} ({t['rule']})")
    s = report["summary"]
    print(f"{s['PASS']} PASS, {s['FAIL']} FAIL, {s['n/a']} n/a; parts broken: {', '.join(broken) or 'none'}")
    print(f"wrote {out} and {out.with_suffix('.md').name} ({report['elapsed_s']:.0f} s)")
    return 0 if not broken and not s["FAIL"] else 1


if __name__ == "__main__":
    a = parse_args(sys.argv[1:])
    if a.worker:
        use_this_checkout()
        worker_main(a.worker, json.loads(a.spec), a.dry_run, "cpu" if a.dry_run else a.device, a.result, a.deadline)
    else:
        sys.exit(main(sys.argv[1:]))
