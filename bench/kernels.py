"""Kernel benchmark: how close one fused ``apply_directions`` pass gets to a plain copy.

Targets are ratios measured in one run on one machine (DESIGN section 8), never absolute times:

* CUDA (backend ``triton``, bf16 buffers of 1e8 .. 2e9 elements): throughput against a
  device-to-device ``copy_`` of the same buffer (Rademacher J=1 >= 85 %, Gaussian J=1 >= 60 %);
  one fused J=2 pass against two J=1 passes; one flat pass against a MeZO-style perturbation
  (``torch.manual_seed`` then ``torch.normal`` + ``add_`` per parameter tensor) over the
  parameter shapes of OPT-1.3B (>= 3x).
* CPU: the C++ kernels against the PyTorch reference in elements/s (>= 20x), with the torch
  copy bandwidth as context.
* Both: bf16 drift of one step's perturb/restore passes, ours fused (2K+1 roundings) against
  MeZO's +λ/−2λ/+λ (3K), through the engine's own passes (``dpzo_engine.zo.drift``).

Uses only the public ``dpzo_engine.ops`` API.  Writes ``bench/results/kernels_<device>.json``
and prints a table.  ``python bench/kernels.py [--device cuda|cpu] [--sizes 1e8,2e9] [--quick]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import common
import torch

from dpzo_engine import ops
from dpzo_engine.core import stream
from dpzo_engine.zo.drift import bf16_drift

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MASTER_SEED = 1234  # public direction seeds, as the trainer derives them
COEF = 1e-3  # small, so repeated in-place passes keep the buffer finite

GPU_SIZES = [100_000_000, 500_000_000, 1_000_000_000, 2_000_000_000]
GPU_SIZES_QUICK = [100_000_000]
GPU_DIRECTIONS = [1, 2, 8, 65]
GPU_DIRECTIONS_QUICK = [1, 2]
TARGET_RADEMACHER_VS_COPY = 0.85
TARGET_GAUSSIAN_VS_COPY = 0.60
TARGET_MEZO_SPEEDUP = 3.0
CLIP_BATCH, CLIP_DIRECTIONS = 64, 256  # clip_aggregate's [B, K]: a Poisson batch of 64, K = 256
CLIP_SUM_TOLERANCE = 1e-9  # relative to the column's sum of |clipped terms| (tests/test_triton_kernels.py)

CPU_DIRECTIONS = [1, 2, 8]
CPU_REFERENCE_SIZE, CPU_REFERENCE_SIZE_QUICK = 1_000_000, 250_000
CPU_SIZE, CPU_SIZE_QUICK = 8_000_000, 2_000_000
TARGET_CPU_SPEEDUP = 20.0

DRIFT_SIZE, DRIFT_SIZE_QUICK = 1_000_000, 100_000  # bf16 weights in the drift comparison (printed, not a target)

# facebook/opt-1.3b hyperparameters (its config.json); the shapes only set the tensor sizes.
OPT_1_3B = dict(
    hidden_size=2048,
    num_hidden_layers=24,
    ffn_dim=8192,
    num_attention_heads=32,
    vocab_size=50272,
    max_position_embeddings=2048,
    word_embed_proj_dim=2048,
    do_layer_norm_before=True,
)
OPT_POSITION_OFFSET = 2  # OPT's learned positional embedding has max_position_embeddings + 2 rows


# ---------------------------------------------------------------------------- helpers
class Timer:
    """Wall time of a callable.  CUDA: median of triton's ``do_bench`` (or of CUDA events).  CPU: best of
    ``reps`` perf_counter runs, since on a shared CPU the noise only ever adds time."""

    def __init__(self, device: torch.device, reps: int = 3) -> None:
        self.device = device
        self.reps = reps

    def __call__(self, fn: Callable[[], object], reps: int | None = None, warmup: int = 1) -> float:
        if self.device.type == "cuda":
            return self._cuda(fn)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps or self.reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def _cuda(self, fn: Callable[[], object]) -> float:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
        fn()
        torch.cuda.synchronize(self.device)
        times = []
        for _ in range(max(self.reps, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


def seeds_and_coefs(J: int, device: torch.device, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    seeds = torch.tensor(stream.step_seeds(MASTER_SEED, step, J), dtype=torch.int64, device=device)
    return seeds, torch.full((J,), COEF, dtype=torch.float32, device=device)


def target(name: str, measured: float | None, threshold: float, rule: str) -> dict:
    ok = None if measured is None else bool(measured >= threshold)
    return {"name": name, "measured": measured, "threshold": threshold, "rule": rule, "pass": ok}


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


# ---------------------------------------------------------------------------- GPU
def opt_shapes(config: dict | None = None) -> list[tuple[int, ...]]:
    """Trainable parameter shapes of an OPT model (default OPT-1.3B; tied LM head once), from
    transformers' OPTConfig built on the meta device (no memory), or by hand without transformers."""
    cfg = OPT_1_3B if config is None else config
    try:
        from transformers import OPTConfig, OPTForCausalLM

        with torch.device("meta"):
            model = OPTForCausalLM(OPTConfig(**cfg))
        return [tuple(p.shape) for p in model.parameters()]
    except ImportError:  # the same list by hand
        h, f, layers = cfg["hidden_size"], cfg["ffn_dim"], cfg["num_hidden_layers"]
        shapes = [(cfg["vocab_size"], h), (cfg["max_position_embeddings"] + OPT_POSITION_OFFSET, h)]
        per_layer = [(h, h), (h,)] * 4 + [(h,), (h,), (f, h), (f,), (h, f), (h,), (h,), (h,)]
        return shapes + per_layer * layers + [(h,), (h,)]


def fits(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes + (512 << 20) < free  # headroom for triton's do_bench cache flush and the allocator


def time_apply(timer: Timer, buf: torch.Tensor, J: int, kind: str, backend: str) -> float:
    seeds, coefs = seeds_and_coefs(J, buf.device)
    return timer(lambda: ops.apply_directions(buf, seeds, coefs, kind, backend=backend))


def time_two_single_passes(timer: Timer, buf: torch.Tensor, kind: str, backend: str) -> float:
    """Two J=1 passes (restore direction k, then perturb along k+1) for the fused-vs-unfused comparison."""
    seeds, coefs = seeds_and_coefs(2, buf.device)

    def two_passes() -> None:
        ops.apply_directions(buf, seeds[:1], coefs[:1], kind, backend=backend)
        ops.apply_directions(buf, seeds[1:], coefs[1:], kind, backend=backend)

    return timer(two_passes)


def bench_size(
    device: torch.device, n: int, directions: Sequence[int], backend: str, timer: Timer
) -> tuple[list[dict], list[dict]]:
    """One bf16 buffer of n elements: copy time, every (kind, J) pass, and fused J=2 vs 2 x J=1."""
    nbytes = 2 * n
    buf = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(buf)
    t_copy = timer(lambda: dst.copy_(buf))
    dst = None  # free it before the passes
    copy_gbs = 2 * nbytes / t_copy / 1e9
    rows, fused = [], []
    for kind in stream.KINDS:
        times = {}
        for J in directions:
            row = {"elements": n, "kind": kind, "J": J, "copy_gb_per_s": copy_gbs}
            try:
                t = times[J] = time_apply(timer, buf, J, kind, backend)
            except Exception as exc:  # report and go on: one failing case must not lose the others
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"})
                continue
            rows.append(
                {
                    **row,
                    "time_ms": t * 1e3,
                    "elements_per_s": n / t,
                    "gb_per_s": 2 * nbytes / t / 1e9,  # read + write of the buffer
                    "ratio_to_copy": t_copy / t,
                }
            )
        if 2 in times:
            t_two = time_two_single_passes(timer, buf, kind, backend)
            fused.append(
                {
                    "elements": n,
                    "kind": kind,
                    "fused_J2_ms": times[2] * 1e3,
                    "two_J1_ms": t_two * 1e3,
                    "speedup": t_two / times[2],
                }
            )
    return rows, fused


def bench_apply_vs_copy(
    device: torch.device, sizes: Sequence[int], directions: Sequence[int], backend: str, timer: Timer
) -> tuple[list[dict], list[dict]]:
    rows, fused = [], []
    for n in sizes:
        if not fits(device, 2 * 2 * n):  # bf16 buffer + copy target
            rows.append({"elements": n, "skipped": "does not fit in free device memory (buffer + copy target)"})
            continue
        size_rows, size_fused = bench_size(device, n, directions, backend, timer)
        rows += size_rows
        fused += size_fused
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, fused


def time_mezo_style(timer: Timer, shapes: list[tuple[int, ...]], device: torch.device) -> float:
    """MeZO's zo_perturb_parameters: one manual_seed, then a full-size normal and an add_ per tensor."""
    params = [torch.zeros(s, dtype=torch.bfloat16, device=device) for s in shapes]

    def mezo_perturb(seed: int = MASTER_SEED, eps: float = COEF) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
            p.add_(z, alpha=eps)

    return timer(mezo_perturb)


def bench_mezo(
    device: torch.device,
    backend: str,
    timer: Timer,
    shapes: list[tuple[int, ...]],
    model: str = "facebook/opt-1.3b (shapes only)",
) -> dict:
    """A MeZO-style perturbation over per-tensor parameters vs one flat fused pass of the same size."""
    total = sum(torch.Size(s).numel() for s in shapes)
    largest = max(torch.Size(s).numel() for s in shapes)
    out = {"model": model, "tensors": len(shapes), "parameters": total}
    if not fits(device, 2 * (total + largest)):  # bf16 params + one z temporary; the flat buffer comes after
        return {**out, "skipped": "does not fit in free device memory"}
    t_mezo = time_mezo_style(timer, shapes, device)
    out["mezo_ms"] = t_mezo * 1e3
    flat = torch.zeros(total, dtype=torch.bfloat16, device=device)
    for kind in stream.KINDS:
        try:
            t = time_apply(timer, flat, 1, kind, backend)
        except Exception as exc:
            out[f"{kind}_error"] = f"{type(exc).__name__}: {exc}"
            continue
        out[f"{kind}_J1_ms"] = t * 1e3
        out[f"speedup_{kind}"] = t_mezo / t
    return out


def gpu_targets(rows: list[dict], fused: list[dict], mezo: dict) -> list[dict]:
    """The GPU targets, read at the largest buffer measured (``pass`` None where not measured)."""
    measured = [r for r in rows if "time_ms" in r]
    largest = max((r["elements"] for r in measured), default=None)

    def at_largest(kind: str, J: int) -> float | None:
        hits = [r["ratio_to_copy"] for r in measured if r["elements"] == largest and r["kind"] == kind and r["J"] == J]
        return hits[0] if hits else None

    fused_at = {f["kind"]: f["speedup"] for f in fused if f["elements"] == largest}
    at = f" ({largest:.2g} elements)" if largest else ""
    targets = [
        target(f"rademacher J=1 vs copy{at}", at_largest("rademacher", 1), TARGET_RADEMACHER_VS_COPY, "ratio >= 0.85"),
        target(f"gaussian J=1 vs copy{at}", at_largest("gaussian", 1), TARGET_GAUSSIAN_VS_COPY, "ratio >= 0.60"),
        *(
            target(
                f"{kind} fused J=2 vs 2 x J=1{at}",
                fused_at.get(kind),
                1.0,
                "speedup > 1 (time(2 x J=1) / time(J=2))",
            )
            for kind in stream.KINDS
        ),
        target(
            f"gaussian J=1 vs MeZO-style ({mezo['model']})", mezo.get("speedup_gaussian"), TARGET_MEZO_SPEEDUP, ">= 3x"
        ),
    ]
    for t in targets[2:4]:  # strictly faster
        if t["measured"] is not None:
            t["pass"] = bool(t["measured"] > 1.0)
    return targets


def bench_gpu(
    device: torch.device, sizes: Sequence[int], directions: Sequence[int], backend: str = "triton"
) -> tuple[dict, list[dict]]:
    timer = Timer(device)
    rows, fused = bench_apply_vs_copy(device, sizes, directions, backend, timer)
    mezo = bench_mezo(device, backend, timer, opt_shapes())
    clip = bench_clip_aggregate(device, backend, timer)
    largest = max((r["elements"] for r in rows if "time_ms" in r), default=None)
    results = {
        "targets_evaluated_at_elements": largest,
        "apply": rows,
        "fused_vs_unfused": fused,
        "mezo": mezo,
        "clip_aggregate": clip,
    }
    return results, gpu_targets(rows, fused, mezo)


def clip_input(B: int, K: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """D[B, K] of per-example differences, about half the rows above the clip, one row non-finite.

    Returns (D, clip, scale) with DP-AggZO's scale 1/K and C the median scaled row norm.
    """
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(B, K, generator=g) * torch.logspace(-1, 1, B).unsqueeze(1)
    scale = 1.0 / K
    clip = float((D * scale).norm(dim=1).median())
    if B > 1:
        D[B // 2, K // 2] = float("nan")
    return D.to(device), clip, scale


def clip_agreement(D: torch.Tensor, clip: float, scale: float, backend: str) -> dict:
    """``clip_aggregate`` on ``backend`` against the PyTorch reference on the same input.

    Counts must be equal; sums agree within 1e-9 of the column's sum of |clipped terms| (the
    kernel tests' tolerance), computed in fp64 from the input.
    """
    ours = ops.clip_aggregate(D, clip, scale, "joint", backend=backend)
    ref = ops.clip_aggregate(D, clip, scale, "joint", backend="reference")
    a = D.double() * scale
    finite = torch.isfinite(a).all(dim=1, keepdim=True)
    a = torch.where(finite, a, torch.zeros_like(a))
    factor = (clip / a.norm(dim=1, keepdim=True).clamp_min(1e-300)).clamp(max=1.0)
    scale_of_terms = (a * factor).abs().sum(dim=0).clamp_min(1e-300)
    rel = float(((ours.sums - ref.sums).abs() / scale_of_terms).max())
    counts_equal = int(ours.num_clipped) == int(ref.num_clipped) and int(ours.num_nonfinite) == int(ref.num_nonfinite)
    return {
        "num_clipped": int(ours.num_clipped),
        "num_nonfinite": int(ours.num_nonfinite),
        "counts_equal_to_reference": counts_equal,
        "max_sum_error_relative_to_terms": rel,
        "tolerance": CLIP_SUM_TOLERANCE,
        "agrees": bool(counts_equal and rel <= CLIP_SUM_TOLERANCE),
    }


def bench_clip_aggregate(
    device: torch.device, backend: str, timer: Timer, B: int = CLIP_BATCH, K: int = CLIP_DIRECTIONS
) -> dict:
    """``clip_aggregate`` on [B, K]: agreement with the reference, and the time of both."""
    D, clip, scale = clip_input(B, K, device)
    out = {"B": B, "K": K, "clip": clip, "scale": scale, "backend": backend}
    try:
        out.update(clip_agreement(D, clip, scale, backend))
        out["time_us"] = 1e6 * timer(lambda: ops.clip_aggregate(D, clip, scale, "joint", backend=backend))
    except Exception as exc:  # reported: the other kernels' figures still count
        return {**out, "error": f"{type(exc).__name__}: {exc}"}
    out["reference_time_us"] = 1e6 * timer(lambda: ops.clip_aggregate(D, clip, scale, "joint", backend="reference"))
    out["speedup_vs_reference"] = out["reference_time_us"] / out["time_us"]
    return out


def print_gpu(results: dict) -> None:
    head = ("elements", "kind", "J", "ms", "Gelem/s", "GB/s", "copy GB/s", "vs copy")
    print("{:>12} {:>10} {:>3} {:>9} {:>8} {:>7} {:>9} {:>7}".format(*head))
    for r in results["apply"]:
        if "time_ms" not in r:
            print(f"{r['elements']:>12} {r.get('kind', ''):>10} {r.get('J', ''):>3}  {r.get('skipped') or r['error']}")
            continue
        print(
            f"{r['elements']:>12} {r['kind']:>10} {r['J']:>3} {r['time_ms']:>9.3f} {r['elements_per_s'] / 1e9:>8.2f}"
            f" {r['gb_per_s']:>7.0f} {r['copy_gb_per_s']:>9.0f} {r['ratio_to_copy']:>7.2f}"
        )
    for f in results["fused_vs_unfused"]:
        print(
            f"fused J=2 vs 2 x J=1 ({f['kind']}, {f['elements']:.2g}): {f['fused_J2_ms']:.3f} ms vs "
            f"{f['two_J1_ms']:.3f} ms -> {f['speedup']:.2f}x"
        )
    m = results["mezo"]
    print(
        f"MeZO-style over {m['tensors']} tensors of {m['model']} ({m['parameters']:.3g} params): "
        f"{fmt(m.get('mezo_ms'))} ms; ours gaussian {fmt(m.get('gaussian_J1_ms'))} ms "
        f"({fmt(m.get('speedup_gaussian'))}x), rademacher {fmt(m.get('rademacher_J1_ms'))} ms "
        f"({fmt(m.get('speedup_rademacher'))}x) {m.get('skipped', '')}"
    )
    if "clip_aggregate" in results:
        print_clip(results["clip_aggregate"])


def print_clip(c: dict) -> None:
    if "error" in c:
        print(f"clip_aggregate [{c['B']}, {c['K']}] ({c['backend']}): {c['error']}")
        return
    print(
        f"clip_aggregate [{c['B']}, {c['K']}] ({c['backend']}): {fmt(c.get('time_us'))} us vs reference "
        f"{fmt(c.get('reference_time_us'))} us ({fmt(c.get('speedup_vs_reference'))}x); counts equal: "
        f"{c['counts_equal_to_reference']}, max sum error {c['max_sum_error_relative_to_terms']:.2g} of the terms "
        f"(tolerance {c['tolerance']:g})"
    )


# ---------------------------------------------------------------------------- CPU
def wall_seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_cpu(
    size: int, reference_size: int, directions: Sequence[int], reps: int, reference_reps: int
) -> tuple[dict, list[dict]]:
    """C++ vs reference elements/s per (kind, dtype, J); torch copy bandwidth as context.

    Reference and C++ runs are interleaved and each side keeps its best time, so a burst of load on a
    shared machine does not land on one side of the ratio only.
    """
    device = torch.device("cpu")
    timer = Timer(device, reps=10)
    copy = {}
    for dtype in (torch.float32, torch.bfloat16):
        src = torch.ones(size, dtype=dtype)
        dst = torch.empty_like(src)
        t = timer(lambda src=src, dst=dst: dst.copy_(src))
        copy[str(dtype).removeprefix("torch.")] = {"elements": size, "gb_per_s": 2 * src.nbytes / t / 1e9}
    try:
        ops.resolve_backend("cpu", device)
        cpp_error = None
    except ops.BackendUnavailable as exc:
        cpp_error = str(exc)
    rows = []
    for kind in stream.KINDS:
        for dtype in (torch.float32, torch.bfloat16):
            for J in directions:
                seeds, coefs = seeds_and_coefs(J, device)
                ref_buf = torch.ones(reference_size, dtype=dtype)
                buf = torch.ones(size, dtype=dtype)

                def reference_pass(b=ref_buf, s=seeds, c=coefs, k=kind):
                    ops.apply_directions(b, s, c, k, backend="reference")

                def cpp_pass(b=buf, s=seeds, c=coefs, k=kind):
                    ops.apply_directions(b, s, c, k, backend="cpu")

                ops.apply_directions(ref_buf[:4096], seeds, coefs, kind, backend="reference")  # warm-up
                if cpp_error is None:
                    cpp_pass()
                t_ref, t_cpp = [], []
                for _ in range(reference_reps):
                    t_ref.append(wall_seconds(reference_pass))
                    if cpp_error is None:
                        t_cpp += [wall_seconds(cpp_pass) for _ in range(reps)]
                row = {"kind": kind, "dtype": str(dtype).removeprefix("torch."), "J": J}
                row.update(reference_elements=reference_size, reference_elements_per_s=reference_size / min(t_ref))
                if t_cpp:
                    row.update(
                        cpp_elements=size,
                        cpp_elements_per_s=size / min(t_cpp),
                        cpp_gb_per_s=2 * buf.nbytes / min(t_cpp) / 1e9,
                        speedup=(size / min(t_cpp)) / (reference_size / min(t_ref)),
                    )
                rows.append(row)
    speedups = [r["speedup"] for r in rows if "speedup" in r]
    results = {
        "threads": torch.get_num_threads(),
        "copy": copy,
        "apply": rows,
        "cpp_error": cpp_error,
        "min_speedup": min(speedups) if speedups else None,
    }
    targets = [
        target(f"C++ vs reference {r['kind']} {r['dtype']} J={r['J']}", r.get("speedup"), TARGET_CPU_SPEEDUP, ">= 20x")
        for r in rows
    ]
    return results, targets


def print_cpu(results: dict) -> None:
    for dtype, c in results["copy"].items():
        n, threads = c["elements"], results["threads"]
        print(f"torch copy {dtype}: {c['gb_per_s']:.1f} GB/s ({n:.2g} elements, {threads} threads)")
    if results["cpp_error"]:
        print(results["cpp_error"])
    print(f"{'kind':>10} {'dtype':>8} {'J':>2} {'ref Melem/s':>11} {'C++ Melem/s':>11} {'C++ GB/s':>8} {'speedup':>8}")
    for r in results["apply"]:
        cpp = r.get("cpp_elements_per_s")
        print(
            f"{r['kind']:>10} {r['dtype']:>8} {r['J']:>2} {r['reference_elements_per_s'] / 1e6:>11.2f}"
            f" {fmt(cpp and cpp / 1e6, '.1f'):>11} {fmt(r.get('cpp_gb_per_s'), '.2f'):>8}"
            f" {fmt(r.get('speedup'), '.1f'):>7}x"
        )


# ---------------------------------------------------------------------------- main
def parse_sizes(text: str | None) -> list[int] | None:
    return None if not text else [int(float(s)) for s in text.split(",") if s.strip()]


def print_drift(d: dict) -> None:
    print(
        f"\nbf16 drift after one step's passes, K={d['directions']}, λ={d['zo_eps']:g}, {d['numel']:,} weights "
        f"~ N(0, 0.02²), {d['backend']}:\n  fused restore-and-perturb ({d['fused_passes']} passes): "
        f"{d['fused_mean_ulps']:.3f} ulp mean |drift|\n  MeZO +λ/−2λ/+λ ({d['mezo_passes']} passes): "
        f"{d['mezo_mean_ulps']:.3f} ulp   ratio {d['fused_mean_ulps'] / d['mezo_mean_ulps']:.2f}"
    )


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda[:i] or cpu")
    parser.add_argument("--sizes", help="comma-separated buffer sizes in elements (e.g. 1e8,2e9); CPU: C++ size")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer cases (smoke run)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sizes = parse_sizes(args.sizes)
    started = time.perf_counter()
    info = {
        "benchmark": "kernels",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": common.cpu_name(),
        "torch": torch.__version__,
        "triton": common.triton_version(),
        "python": platform.python_version(),
        "quick": args.quick,
        "coef": COEF,
        "timing": "median of triton.testing.do_bench"
        if device.type == "cuda"
        else "C++: best of 3 (quick: 2) perf_counter runs, interleaved with 1 reference run",
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info["gpu"] = name
        results, targets = bench_gpu(
            device,
            sizes or (GPU_SIZES_QUICK if args.quick else GPU_SIZES),
            GPU_DIRECTIONS_QUICK if args.quick else GPU_DIRECTIONS,
        )
        print_gpu(results)
        default_name = common.slug(name)
    elif device.type == "cpu":
        size = (sizes or [CPU_SIZE_QUICK if args.quick else CPU_SIZE])[0]
        reference_size = CPU_REFERENCE_SIZE_QUICK if args.quick else CPU_REFERENCE_SIZE
        results, targets = bench_cpu(
            size, reference_size, CPU_DIRECTIONS, reps=2 if args.quick else 3, reference_reps=1
        )
        print_cpu(results)
        default_name = "cpu-" + common.slug(info["cpu"])
    else:
        parser.error(f"unsupported device {device}")
    results["drift"] = bf16_drift(numel=DRIFT_SIZE_QUICK if args.quick else DRIFT_SIZE, directions=16, device=device)
    print_drift(results["drift"])
    info["seconds"] = round(time.perf_counter() - started, 1)
    report = {**info, "targets": targets, "all_pass": all(t["pass"] is True for t in targets), "results": results}
    out = args.out or RESULTS_DIR / f"kernels_{default_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\ntargets:")
    common.print_targets(targets, fmt)
    print(f"wrote {out} ({info['seconds']} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
