"""Peak GPU memory of one training step: zeroth-order methods against DP-AdamW, OOM included.

Why: DP first-order fine-tuning does not fit where DP zeroth-order does. For each model and each
of the papers' batch settings this measures ``torch.cuda.max_memory_allocated`` (after a reset,
over two training steps) of

* ``inference``: one forward of the per-example loss without gradients (the baseline),
* ``mezo``, ``dpzero``, ``dp-aggzo`` (K = 16 and 64: memory must not grow with K) and
  ``dp-zopo`` (K = 1 with its data-free mask resident) on the fused engine, full fine-tuning,
* ``dp-adamw`` (Opacus; ghost clipping, or per-layer per-sample gradients where parameters are
  tied), ``adamw`` (non-private), both with fp32 master weights and moments for the bf16 model,
  and ``dp-adamw-bf16``: weights, gradients and moments all bf16 (the leanest first-order set-up,
  a lower bound).

Models (OPT-125m ... 6.7B, RoBERTa-large) are built from their configs with random bf16 weights
directly on the GPU. Every (model, setting, method) cell runs in a fresh process, so peaks are
clean and a CUDA OOM is a result, not a crash. Writes ``bench/results/memory_vs_dpadam_<device>``
``.json``, ``.png`` (bar chart) and ``.md`` (the README table), and prints the table.

    python bench/memory_vs_dpadam.py                  # CUDA: every model, method and setting
    python bench/memory_vs_dpadam.py --device cpu     # smoke test: OPT-125m and 350m, batch 2, K = 2 and 4
    python bench/memory_vs_dpadam.py --quick --inline # seconds: tiny model, in this process

Without CUDA there is no GPU peak to read: the CPU run checks that every cell runs and reports
each worker's max RSS (interpreter included), which is not comparable to the GPU figures. A full
GPU run is 99 cells, each a fresh process (the OPT-6.7B ones take longest); ``--models``, ``--settings``
and ``--methods`` select a part, e.g. to split it across sessions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import common
import torch

from dpzo_engine import privacy
from dpzo_engine.core import stream
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.heads import SequenceClassificationHead
from dpzo_engine.zo.engine import ZOEngine
from dpzo_engine.zo.rules import MeZORule, PrivateRule

GPU_MODELS = ["opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "roberta-large"]
CPU_MODELS = ["opt-125m", "opt-350m"]  # the two smallest
QUICK_MODELS = ["opt-tiny"]
SETTINGS = ["sst2", "squad"]
DIRECTIONS, SMALL_DIRECTIONS = (16, 64), (2, 4)  # small: CPU and quick runs (passes are slow on a CPU)
CPU_BATCH, CPU_LENGTH = 2, 16  # CPU smoke: no memory figure to read, only the code path
QUICK_BATCH, QUICK_LENGTH = 2, 12
STEPS, CPU_STEPS = 2, 1  # GPU: the peak over two steps (first-order optimiser state exists from the second on)
ZO_EPS, LR, CLIP, SIGMA = 1e-3, 1e-6, 1.0, 1.0
MASTER_SEED = 0
CELL_TIMEOUT_S = 1800
TARGET_AGGZO_GIB = 14.0  # OPT-6.7B, SST-2 (the DP-AggZO paper reports 15.24 GiB)
TARGET_AGGZO_VS_INFERENCE = 1.05
TARGET_K_GROWTH = 1.01


def method_names(directions: Sequence[int]) -> list[str]:
    return [
        "inference", "mezo", "dpzero", *(f"dp-aggzo-k{k}" for k in directions), "dp-zopo",
        "dp-adamw", "dp-adamw-bf16", "adamw",
    ]  # fmt: skip


DESCRIPTIONS = {
    "inference": "one forward of the per-example loss, no gradients (the baseline)",
    "mezo": "fused engine, K = 1, batch-mean rule, central differences",
    "dpzero": "fused engine, K = 1, per-example clip + Gaussian noise",
    "dp-aggzo-k*": "fused engine, K directions, joint K-space clip + noise, central differences",
    "dp-zopo": "fused engine, K = 1 private step with a data-free mask (1% kept, static; dpzo_engine.zo.pruning)",
    "dp-adamw": "Opacus per-example clipping (mode in each cell), AdamW with fp32 master weights and moments",
    "dp-adamw-bf16": "as dp-adamw, but weights, gradients and AdamW moments all bf16 (a lower bound)",
    "adamw": "non-private AdamW, fp32 master weights and moments",
}


# ----------------------------------------------------------------------------- one cell (worker)


def _loss(setting: common.Setting):
    return (
        SequenceClassificationHead()
        if setting.head == "sequence-classification"
        else common.AnswerNLL(setting.answer_tokens)
    )


def _zo_step(model, flat: FlatParams, loss, batch, method: str, device: torch.device, info: dict) -> Callable:
    """A ZO training step of ``method`` on the fused engine (state built here, before the reset)."""
    k = int(method.removeprefix("dp-aggzo-k")) if method.startswith("dp-aggzo-k") else 1
    masks = None
    if method == "dp-zopo":
        from dpzo_engine.zo import pruning

        policy = pruning.MaskPolicy(model, flat, master_seed=MASTER_SEED)
        _reset_peak(device)
        record = policy.update(0)
        info.update(
            mask_bytes=policy.mask.nbytes,
            mask_extra_bytes=pruning.mask_extra_bytes(flat),
            mask_kept_fraction=record["fraction"],
            mask_compute_peak_bytes=_peak(device),
        )
        masks = policy.mask.engine_masks()
    engine = ZOEngine(flat, "gaussian", "auto", "central", masks=masks)
    if method == "mezo":
        rule = MeZORule()
    else:
        mechanism = privacy.GaussianMechanism(SIGMA, CLIP, k, "joint", generator=privacy.secret_generator())
        rule = PrivateRule(mechanism, float(len(batch["labels"])), backend=engine.backend)
    rounding = "stochastic" if flat.buffers[0].dtype == torch.bfloat16 else "nearest"
    info.update(directions=k, backend=engine.backend, rounding=rounding)

    def step(t: int) -> None:
        seeds = stream.step_seeds(MASTER_SEED, t, k)
        with torch.no_grad():
            D = engine.estimate(lambda: loss.per_example_loss(model, batch), seeds, ZO_EPS)
            coefs = (-LR * rule(D).grad).to(torch.float32).tolist()
            engine.finish(seeds, ZO_EPS, coefs, rounding, stream.rounding_seed(MASTER_SEED, t))

    return step


def _first_order_step(model, loss, batch, method: str, device: torch.device, info: dict) -> Callable:
    from dpzo_engine.run.first_order import FirstOrderTrainer

    trainer = FirstOrderTrainer(model, loss, lr=LR, master_weights=False if method == "dp-adamw-bf16" else None)
    if method != "adamw":
        trainer.make_private(
            noise_multiplier=SIGMA,
            clip=CLIP,
            expected_batch_size=float(len(batch["labels"])),
            generator=privacy.secret_device_generator(device),
        )
    info["first_order"] = trainer.describe()
    return lambda t: trainer.step(batch)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(cell: dict) -> dict:
    """Build the model, set the method up, reset the peak, run ``steps`` steps: one result row."""
    device, dtype = torch.device(cell["device"]), getattr(torch, cell["dtype"])
    setting = common.Setting(**cell["setting"])
    method = cell["method"]
    row: dict = {k: cell[k] for k in ("model", "method")} | {"setting": setting.name}
    row["phase"] = "setup"  # where an OOM or error happened: setup (model, optimiser state, mask) or step
    try:
        model = common.build_model(cell["model"], setting.head, dtype, device)
        batch = common.full_length_batch(model, setting.batch, setting.length)
        loss = _loss(setting)
        row["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        row["parameters"] = sum(p.numel() for p in model.parameters())
        if method == "inference":

            def step(t: int) -> None:
                with torch.no_grad():
                    loss.per_example_loss(model, batch)

        elif method in ("dp-adamw", "dp-adamw-bf16", "adamw"):
            model.train()  # first-order fine-tuning runs with dropout, as configured
            step = _first_order_step(model, loss, batch, method, device, row)
        else:
            step = _zo_step(model, FlatParams(model), loss, batch, method, device, row)
        row["setup_peak_bytes"] = _peak(device)
        row["before_step_bytes"] = _allocated(device)
        _reset_peak(device)
        row["phase"] = "step"
        start = time.perf_counter()
        for t in range(cell["steps"]):
            step(t)
        row["peak_bytes"] = _peak(device)
        row["seconds_per_step"] = (time.perf_counter() - start) / cell["steps"]
        row["status"] = "ok"
    except Exception as exc:  # recorded, not raised: one failing cell must not lose the others
        if _out_of_memory(exc):
            row.update(status="oom", peak_bytes_before_oom=_peak(device), message=_first_line(exc))
        else:
            row.update(status="error", message=f"{type(exc).__name__}: {_first_line(exc)}")
    row["cpu_max_rss_bytes"] = _max_rss()
    return row


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or the CPU allocator's failure (a RuntimeError there)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__


def worker_main(cell_json: str) -> None:
    torch.manual_seed(0)
    print("RESULT " + json.dumps(measure(json.loads(cell_json))), flush=True)


# ----------------------------------------------------------------------------- orchestration


def run_cell(cell: dict, inline: bool, timeout: float) -> dict:
    """One measurement: in a fresh process (clean peak; an OOM or a crash stays a result) or inline."""
    if inline:
        return measure(cell)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cell)]
    base = {"model": cell["model"], "setting": cell["setting"]["name"], "method": cell["method"]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "message": f"no result within {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {**base, "status": "crashed", "returncode": proc.returncode, "message": tail[-400:]}


def gib(x: int | None) -> float | None:
    return None if x is None else x / common.GIB


def shown(row: dict, cpu: bool) -> str:
    if row["status"] == "ok":
        value = row["cpu_max_rss_bytes"] if cpu else row["peak_bytes"]
        return f"{gib(value):.2f}"
    return row["status"].upper()


def markdown_table(rows: list[dict], methods: list[str], cpu: bool) -> str:
    unit = "max RSS of the worker, GiB (CPU: not a GPU figure)" if cpu else "peak GiB"
    lines = [f"| model | setting | {' | '.join(methods)} |", "|---|---|" + "---|" * len(methods)]
    cells = {(r["model"], r["setting"], r["method"]): r for r in rows}
    for model, setting in dict.fromkeys((r["model"], r["setting"]) for r in rows):
        vals = [shown(cells[(model, setting, m)], cpu) if (model, setting, m) in cells else "-" for m in methods]
        lines.append(f"| {model} | {setting} | {' | '.join(vals)} |")
    return "\n".join(lines) + f"\n\nValues: {unit}; OOM: CUDA out of memory.\n"


def evaluate_targets(
    rows: list[dict],
    directions: Sequence[int],
    capacity_gib: float | None,
    adamw_must_oom: bool = True,
    model: str = "opt-6.7b",
    setting: str = "sst2",
) -> list[dict]:
    """The issue's targets, read from the measured rows (``pass`` is None where a cell was not measured).

    The absolute ones are read on ``model`` in ``setting`` (the claim: OPT-6.7B, SST-2).
    ``adamw_must_oom``: DP-AdamW passes only as an OOM (the claim on an 80 GB card); otherwise a
    measured peak passes too (on a larger card the figure itself is the result).
    """
    cells = {(r["model"], r["setting"], r["method"]): r for r in rows}

    def peak(model: str, setting: str, method: str) -> float | None:
        r = cells.get((model, setting, method))
        return gib(r["peak_bytes"]) if r and r["status"] == "ok" and r.get("peak_bytes") else None

    aggzo = [peak(model, setting, f"dp-aggzo-k{k}") for k in directions]
    worst = max(aggzo) if aggzo and None not in aggzo else None
    inference = peak(model, setting, "inference")
    ratio = worst / inference if worst is not None and inference else None
    dp = cells.get((model, setting, "dp-adamw"))
    growth = []
    for m, s in dict.fromkeys((r["model"], r["setting"]) for r in rows):
        vals = [peak(m, s, f"dp-aggzo-k{k}") for k in directions]
        if len(vals) >= 2 and None not in vals:
            growth.append(max(vals) / min(vals))
    capacity = f"{capacity_gib:.0f} GiB" if capacity_gib else "this GPU"
    dp_ok = ("oom",) if adamw_must_oom else ("oom", "ok")
    if dp is None or dp["status"] == "skipped":
        dp_measured = dp and f"skipped: {dp.get('message', '')}"
    else:
        dp_measured = (
            f"{gib(dp['peak_bytes']):.2f} GiB" if dp["status"] == "ok" and dp.get("peak_bytes") else dp["status"]
        )
    at = f"{model}, {setting}"
    return [
        _target(f"DP-AggZO peak, {at} (GiB, worst K)", worst, TARGET_AGGZO_GIB, "<= 14 GiB"),
        _target(f"DP-AggZO / inference-only forward, {at}", ratio, TARGET_AGGZO_VS_INFERENCE, "<= 1.05x"),
        {
            "name": f"DP-AdamW, {at}, on {capacity}",
            "measured": dp_measured,
            "threshold": "oom" if adamw_must_oom else "oom or a peak",
            "rule": "reported as OOM" if adamw_must_oom else "OOM, or its peak measured",
            "pass": None if dp is None or dp["status"] == "skipped" else dp["status"] in dp_ok,
        },
        _target(
            f"DP-AggZO peak, largest K / smallest K (worst cell, K = {list(directions)})",
            max(growth) if growth else None,
            TARGET_K_GROWTH,
            "<= 1.01x",
        ),
    ]


def _target(name: str, measured: float | None, threshold: float, rule: str) -> dict:
    ok = None if measured is None else bool(measured <= threshold)
    return {"name": name, "measured": measured, "threshold": threshold, "rule": rule, "pass": ok}


def bar_chart(
    rows: list[dict], methods: list[str], path: Path, title: str, capacity_gib: float | None, key: str, ylabel: str
) -> None:
    """Grouped bars per (model, setting), one colour per method, log scale; OOM as a hatched bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["setting"]) for r in rows))
    cells = {(r["model"], r["setting"], r["method"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups) * len(methods) / 4), 5.5))
    width = 0.8 / len(methods)
    cmap = plt.get_cmap("tab10")
    top = capacity_gib or max((gib(r.get(key)) or 0 for r in rows), default=1) * 1.3
    for j, method in enumerate(methods):
        xs, hs, ooms = [], [], []
        for i, g in enumerate(groups):
            r = cells.get((*g, method))
            x = i + (j - (len(methods) - 1) / 2) * width
            if r and r["status"] == "ok" and r.get(key):
                xs.append(x)
                hs.append(gib(r[key]))
            elif r and r["status"] == "oom":
                ooms.append(x)
        ax.bar(xs, hs, width, label=method, color=cmap(j % 10))
        if ooms:
            ax.bar(ooms, [top] * len(ooms), width, color="none", edgecolor=cmap(j % 10), hatch="//")
            for x in ooms:
                ax.text(x, top, "OOM", rotation=90, ha="center", va="top", fontsize=7)
    if capacity_gib:
        ax.axhline(capacity_gib, color="black", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\n{s}" for m, s in groups], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def build_cells(
    device: torch.device,
    models: Sequence[str],
    settings: Sequence[str],
    methods: Sequence[str],
    dtype: str,
    steps: int,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> list[dict]:
    """One cell per (model, setting, method); ``batch_size`` / ``seq_len`` override every setting's."""
    cells = []
    for model in models:
        for name in settings:
            setting = common.setting_for(name, model)
            if setting is None:
                continue  # e.g. RoBERTa-large has no SQuAD setting in the papers
            fields = dict(vars(setting))
            if batch_size:
                fields["batch"] = batch_size
            if seq_len:
                fields["length"] = max(seq_len, fields["answer_tokens"] + 2)
            for method in methods:
                cells.append(
                    {"model": model, "setting": fields, "method": method, "device": str(device),
                     "dtype": dtype, "steps": steps}
                )  # fmt: skip
    return cells


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda[:i] or cpu")
    p.add_argument("--models", help=f"comma-separated, from {', '.join(common.MODELS)}")
    p.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="sst2, squad (comma-separated)")
    p.add_argument("--directions", help="K values for DP-AggZO [16,64; CPU and quick: 2,4]")
    p.add_argument("--batch-size", type=int, help="override every setting's batch (CPU default: 2)")
    p.add_argument("--seq-len", type=int, help="override every setting's tokens per example (CPU default: 16)")
    p.add_argument("--dtype", help="model dtype [bfloat16 on CUDA, float32 on CPU]")
    p.add_argument("--steps", type=int, help=f"steps per cell; the peak is over all [{STEPS}; CPU: {CPU_STEPS}]")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, K = 2 and 4, small batch")
    p.add_argument("--inline", action="store_true", help="measure in this process (smoke runs; peaks not clean)")
    p.add_argument("--timeout", type=float, default=CELL_TIMEOUT_S, help="seconds per cell [%(default)s]")
    p.add_argument("--out", type=Path, help="JSON path [bench/results/memory_vs_dpadam_<device>.json]")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type != "cuda"
    default_k = SMALL_DIRECTIONS if args.quick or cpu else DIRECTIONS
    args.steps = args.steps or (CPU_STEPS if cpu else STEPS)
    directions = [int(k) for k in args.directions.split(",")] if args.directions else list(default_k)
    default_models = QUICK_MODELS if args.quick else CPU_MODELS if cpu else GPU_MODELS
    models = args.models.split(",") if args.models else default_models
    unknown = [m for m in models if m not in common.MODELS]
    all_methods = method_names(directions)
    methods = args.methods.split(",") if args.methods else all_methods
    unknown += [m for m in methods if m not in all_methods]
    if unknown:
        raise SystemExit(f"error: unknown model or method: {', '.join(unknown)}")
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    if cpu and not args.batch_size:
        args.batch_size = QUICK_BATCH if args.quick else CPU_BATCH
    if cpu and not args.seq_len:
        args.seq_len = QUICK_LENGTH if args.quick else CPU_LENGTH
    info = {
        "benchmark": "memory_vs_dpadam",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if not cpu else None,
        "gpu_total_bytes": torch.cuda.get_device_properties(device).total_memory if not cpu else None,
        "cpu": common.cpu_name(),
        "torch": torch.__version__,
        "triton": common.triton_version(),
        "python": platform.python_version(),
        "dtype": args.dtype,
        "steps_per_cell": args.steps,
        "isolation": "inline" if args.inline else "one process per cell",
        "measure": (
            "max RSS of each worker only: memory figures need a GPU"
            if cpu
            else "torch.cuda.max_memory_allocated after reset_peak_memory_stats, over the steps of the cell"
        ),
        "settings": {f"{k[0]}/{k[1]}": vars(v) for k, v in common.SETTINGS.items()},
        "overrides": {"batch": args.batch_size, "length": args.seq_len},
        "heads": (
            "sst2: sequence-classification head (AutoModelForSequenceClassification, no LM head); squad: causal LM, "
            "answer NLL from hidden states gathered at the answer positions before the LM head module"
        ),
        "methods": DESCRIPTIONS,
        "hyperparameters": {"zo_eps": ZO_EPS, "lr": LR, "clip": CLIP, "noise_multiplier": SIGMA},
        "directions": directions,
    }  # fmt: skip
    if cpu:
        print("no CUDA: CPU smoke run; memory figures need a GPU (the table shows each worker's max RSS)")
    started = time.perf_counter()
    rows = []
    cells = build_cells(device, models, args.settings, methods, args.dtype, args.steps, args.batch_size, args.seq_len)
    for cell in cells:
        row = run_cell(cell, args.inline, args.timeout)
        rows.append(row)
        value = row.get("peak_bytes") if not cpu else row.get("cpu_max_rss_bytes")
        extra = row.get("message", "") if row["status"] != "ok" else ""
        print(f"{row['model']:>14} {row['setting']:>6} {row['method']:>14}  {row['status']:>7}  "
              f"{'-' if value is None else f'{gib(value):8.2f} GiB'}  {extra}", flush=True)  # fmt: skip
    capacity = gib(info["gpu_total_bytes"])
    targets = evaluate_targets(rows, directions, capacity) if not cpu else []
    info["seconds"] = round(time.perf_counter() - started, 1)
    report = {**info, "targets": targets, "results": rows}
    out = args.out or common.RESULTS_DIR / f"memory_vs_dpadam_{common.device_label(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(rows, methods, cpu)
    header = f"Peak memory of one training step on {info['gpu'] or 'CPU (smoke run)'}, {args.dtype}."
    out.with_suffix(".md").write_text(header + "\n\n" + table)
    if cpu:
        title, key, ylabel = "CPU smoke run: worker max RSS, NOT GPU memory", "cpu_max_rss_bytes", "max RSS (GiB, log)"
    else:
        title = f"{info['gpu']}: peak memory of one training step ({args.dtype})"
        key, ylabel = "peak_bytes", "peak GPU memory of a training step (GiB, log scale)"
    bar_chart(rows, methods, out.with_suffix(".png"), title, capacity, key, ylabel)
    print("\n" + table)
    common.print_targets(targets, lambda m: f"{m:.3f}" if isinstance(m, float) else str(m))
    print(f"wrote {out} (+ .md, .png) in {info['seconds']} s")
    return report


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[sys.argv.index("--worker") + 1])
    else:
        main(sys.argv[1:])
