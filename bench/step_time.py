"""Time per DP-AggZO step: the fused engine against a MeZO-style implementation of the same algorithm.

Why: the engine exists to be faster than the published ZO code. Three implementations of one
DP-AggZO step (K directions, per-example losses, joint K-space clip, Gaussian noise from the
secret generator, normalisation by the batch size, update), timed in the same run on the same
random-init model, batch and per-example losses:

(a) ours, central differences: fused passes over the flat buffer (2K forwards, 2K + 1 passes),
    hidden states gathered before the LM head (label-word logits only);
(b) ours, forward differences (K + 1 forwards, K + 1 passes);
(c) MeZO-style, written here after MeZO's trainer: per direction ``torch.manual_seed(seed)`` then
    ``torch.normal`` per parameter tensor for each of the +λ / −2λ / +λ passes
    (``p.data = p.data + scale·λ·z``), a separate update pass per direction, and the model's
    full-vocabulary logits (log-softmax over the vocabulary for the causal LM).

The clip, the noise and the update coefficients are the engine's ``PrivateRule`` for all three,
so only the implementation differs. Reported: median step time over interleaved repetitions,
the ratios (c)/(a) and (c)/(b), and, from one instrumented step each (a device sync around every
forward), the share of the step spent outside the forward passes.

    python bench/step_time.py                # CUDA: OPT-1.3B and RoBERTa-large, K = 16 and 64, bf16
    python bench/step_time.py --device cpu   # CPU: OPT-125m, K = 2 and 4, small batch (code path only)
    python bench/step_time.py --quick        # seconds: a tiny OPT, K = 2

Writes ``bench/results/step_time_<device>.json`` and prints a table. Targets (GPU): (c)/(a) >= 2,
(c)/(b) >= 3.5, time outside the forwards <= 10% of our step.
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
from torch import nn

from dpzo_engine import privacy
from dpzo_engine.core import stream
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.zo.engine import ZOEngine
from dpzo_engine.zo.rules import PrivateRule

GPU_MODELS, CPU_MODELS, QUICK_MODELS = ["opt-1.3b", "roberta-large"], ["opt-125m"], ["opt-small"]
GPU_DIRECTIONS, CPU_DIRECTIONS, QUICK_DIRECTIONS = (16, 64), (2, 4), (2,)
CPU_BATCH, CPU_LENGTH, QUICK_BATCH, QUICK_LENGTH = 4, 32, 2, 8
GPU_REPS, CPU_REPS = 3, 1
ZO_EPS, LR, CLIP, SIGMA = 1e-3, 1e-6, 1.0, 1.0
MASTER_SEED = 0
TARGET_CENTRAL, TARGET_FORWARD, TARGET_OUTSIDE = 2.0, 3.5, 0.10
IMPLEMENTATIONS = ("ours-central", "ours-forward", "mezo-style")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardClock:
    """Adds up the wall time of the forwards it wraps (with a device sync on each side) when on."""

    def __init__(self, device: torch.device):
        self.device, self.on, self.seconds, self.count = device, False, 0.0, 0

    def wrap(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def timed() -> torch.Tensor:
            if not self.on:
                return fn()
            sync(self.device)
            start = time.perf_counter()
            out = fn()
            sync(self.device)
            self.seconds += time.perf_counter() - start
            self.count += 1
            return out

        return timed


def private_rule(k: int, batch_size: int, backend: str) -> PrivateRule:
    """DP-AggZO's release: joint clip in K-space, N(0, σ²C²) per coordinate from the secret generator, / B."""
    mechanism = privacy.GaussianMechanism(SIGMA, CLIP, k, "joint", generator=privacy.secret_generator())
    return PrivateRule(mechanism, float(batch_size), backend=backend)


class OursStep:
    """One DP-AggZO step on the fused engine (the trainer's step without its logging)."""

    def __init__(self, model: nn.Module, flat: FlatParams, loss, batch: dict, k: int, difference: str, clock):
        self.flat = flat
        self.engine = ZOEngine(flat, "gaussian", "auto", difference)
        self.rule = private_rule(k, len(batch["labels"]), self.engine.backend)
        self.loss = clock.wrap(lambda: loss.per_example_loss(model, batch))
        self.k = k
        self.rounding = "stochastic" if self.flat.buffers[0].dtype == torch.bfloat16 else "nearest"

    def __call__(self, t: int) -> None:
        seeds = stream.step_seeds(MASTER_SEED, t, self.k)
        with torch.no_grad():
            D = self.engine.estimate(self.loss, seeds, ZO_EPS)
            coefs = (-LR * self.rule(D).grad).to(torch.float32).tolist()
            self.engine.finish(seeds, ZO_EPS, coefs, self.rounding, stream.rounding_seed(MASTER_SEED, t))


class MeZOStyleStep:
    """The same DP-AggZO step written the way MeZO's trainer (``zo_perturb_parameters``,
    ``zo_update``) regenerates directions: reseed, then ``torch.normal`` per parameter tensor."""

    def __init__(self, model: nn.Module, loss, batch: dict, k: int, clock: ForwardClock):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.rule = private_rule(k, len(batch["labels"]), "auto")
        self.loss = clock.wrap(lambda: loss.per_example_loss(model, batch))
        self.k = k

    def perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * ZO_EPS

    def update(self, seed: int, projected_grad: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data - LR * (projected_grad * z)

    def __call__(self, t: int) -> None:
        seeds = [s % (1 << 63) for s in stream.step_seeds(MASTER_SEED, t, self.k)]
        with torch.no_grad():
            columns = []
            for seed in seeds:
                self.perturb(seed, 1)
                plus = self.loss().float()
                self.perturb(seed, -2)
                minus = self.loss().float()
                self.perturb(seed, 1)
                columns.append((plus - minus) / (2 * ZO_EPS))
            grads = self.rule(torch.stack(columns, dim=1)).grad.tolist()
            for seed, g in zip(seeds, grads):
                self.update(seed, g)


def time_steps(steps: dict[str, Callable[[int], None]], reps: int, device: torch.device, t0: int) -> dict:
    """Interleaved repetitions (each implementation once per round): wall seconds per implementation."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    t = t0
    for _ in range(reps):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step(t)
            sync(device)
            times[name].append(time.perf_counter() - start)
            t += 1
    return times


def bench_model(name: str, directions: Sequence[int], batch_size: int, length: int, reps: int, device, dtype) -> dict:
    arch = common.MODELS[name][0]
    masked = arch == "roberta"
    head = "mlm-prompt" if masked else "causal-prompt"
    ours_model = common.build_model(name, head, dtype, device, seed=0)
    mezo_model = common.build_model(name, head, dtype, device, seed=0)
    batch = common.prompt_batch(ours_model, batch_size, length, masked)
    vocab = ours_model.config.vocab_size
    label_words = (vocab // 4, vocab // 2)  # two vocabulary ids standing for " terrible" / " great"
    ours_loss = common.LabelWordLoss(masked, label_words, gathered=True)
    mezo_loss = common.LabelWordLoss(masked, label_words, gathered=False)
    with torch.no_grad():
        a, b = ours_loss.per_example_loss(ours_model, batch), mezo_loss.per_example_loss(mezo_model, batch)
    out = {
        "model": name,
        "loss": "label words" + (" at the mask (masked LM)" if masked else " at the last token (causal LM)"),
        "batch": batch_size,
        "length": length,
        "parameters": sum(p.numel() for p in ours_model.parameters()),
        "loss_max_abs_difference": float((a - b).abs().max()),  # same per-example losses, two code paths
        "rows": [],
    }
    clock = ForwardClock(device)
    flat = FlatParams(ours_model)  # once: the parameters become views of one buffer per dtype
    for k in directions:
        steps = {
            "ours-central": OursStep(ours_model, flat, ours_loss, batch, k, "central", clock),
            "ours-forward": OursStep(ours_model, flat, ours_loss, batch, k, "forward", clock),
            "mezo-style": MeZOStyleStep(mezo_model, mezo_loss, batch, k, clock),
        }
        time_steps(steps, 1, device, t0=0)  # warm-up: kernels compiled, caches filled
        times = time_steps(steps, reps, device, t0=1)
        instrumented = {}
        for impl, step in steps.items():
            clock.on, clock.seconds, clock.count = True, 0.0, 0
            total = time_steps({impl: step}, 1, device, t0=100)[impl][0]
            clock.on = False
            instrumented[impl] = {"step_s": total, "forward_s": clock.seconds, "forwards": clock.count}
        medians = {impl: statistics.median(v) for impl, v in times.items()}
        for impl in IMPLEMENTATIONS:
            ins = instrumented[impl]
            out["rows"].append(
                {
                    "K": k,
                    "implementation": impl,
                    "step_s": medians[impl],
                    "all_step_s": times[impl],
                    "forwards_per_step": ins["forwards"],
                    "passes_per_step": (2 * k + 1 if impl == "ours-central" else k + 1)
                    if impl.startswith("ours")
                    else 4 * k,
                    "instrumented_step_s": ins["step_s"],
                    "instrumented_forward_s": ins["forward_s"],
                    "outside_forward_share": 1 - ins["forward_s"] / ins["step_s"],
                    "speedup_vs_mezo_style": medians["mezo-style"] / medians[impl],
                }
            )
    return out


def evaluate_targets(models: list[dict], gpu: bool) -> list[dict]:
    def target(name: str, values: list[float], threshold: float, rule: str, at_least: bool) -> dict:
        worst = (min(values) if at_least else max(values)) if values else None
        ok = None if worst is None or not gpu else bool(worst >= threshold if at_least else worst <= threshold)
        return {"name": name, "measured": worst, "threshold": threshold, "rule": rule, "pass": ok}

    rows = [r | {"model": m["model"]} for m in models for r in m["rows"]]
    central = [r["speedup_vs_mezo_style"] for r in rows if r["implementation"] == "ours-central"]
    forward = [r["speedup_vs_mezo_style"] for r in rows if r["implementation"] == "ours-forward"]
    outside = [r["outside_forward_share"] for r in rows if r["implementation"].startswith("ours")]
    return [
        target("MeZO-style / ours (central differences), worst case", central, TARGET_CENTRAL, ">= 2x", True),
        target("MeZO-style / ours (forward differences), worst case", forward, TARGET_FORWARD, ">= 3.5x", True),
        target("share of our step outside the forward passes, worst case", outside, TARGET_OUTSIDE, "<= 10%", False),
    ]


def print_table(models: list[dict]) -> None:
    print(f"{'model':>14} {'K':>3} {'implementation':>14} {'step s':>9} {'vs MeZO':>8} {'outside fwd':>11} {'fwd':>4}")
    for m in models:
        for r in m["rows"]:
            print(
                f"{m['model']:>14} {r['K']:>3} {r['implementation']:>14} {r['step_s']:>9.4f}"
                f" {r['speedup_vs_mezo_style']:>7.2f}x {100 * r['outside_forward_share']:>10.1f}%"
                f" {r['forwards_per_step']:>4}"
            )


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda[:i] or cpu")
    p.add_argument("--models", help=f"comma-separated, from {', '.join(common.MODELS)}")
    p.add_argument("--directions", help="K values [16,64 on CUDA; 2,4 on CPU; 2 quick]")
    p.add_argument("--batch-size", type=int, help="examples per step [the SST-2 setting on CUDA; 4 on CPU]")
    p.add_argument("--seq-len", type=int, help="tokens per example [the SST-2 setting on CUDA; 32 on CPU]")
    p.add_argument("--dtype", help="model dtype [bfloat16 on CUDA, float32 on CPU]")
    p.add_argument(
        "--reps", type=int, help=f"timed repetitions per implementation [{GPU_REPS} on CUDA, {CPU_REPS} on CPU]"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny OPT, K = 2, two examples")
    p.add_argument("--out", type=Path, help="JSON path [bench/results/step_time_<device>.json]")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        models, directions, reps = QUICK_MODELS, QUICK_DIRECTIONS, 1
    else:
        models, directions = (GPU_MODELS, GPU_DIRECTIONS) if gpu else (CPU_MODELS, CPU_DIRECTIONS)
        reps = GPU_REPS if gpu else CPU_REPS
    models = args.models.split(",") if args.models else models
    if unknown := [m for m in models if m not in common.MODELS]:
        raise SystemExit(f"error: unknown model: {', '.join(unknown)}")
    directions = [int(k) for k in args.directions.split(",")] if args.directions else list(directions)
    reps = args.reps or reps
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    started = time.perf_counter()
    results = []
    for name in models:
        setting = common.setting_for("sst2", name)
        batch = args.batch_size or (QUICK_BATCH if args.quick else setting.batch if gpu else CPU_BATCH)
        length = args.seq_len or (QUICK_LENGTH if args.quick else setting.length if gpu else CPU_LENGTH)
        results.append(bench_model(name, directions, batch, length, reps, device, dtype))
        if gpu:
            torch.cuda.empty_cache()
    targets = evaluate_targets(results, gpu)
    report = {
        "benchmark": "step_time",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if gpu else None,
        "cpu": common.cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": common.triton_version(),
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "reps": reps,
        "timing": "median wall time of interleaved steps, device-synchronised; forward share from one "
        "instrumented step per implementation (sync around each forward)",
        "algorithm": "DP-AggZO: per-example losses, joint K-space clip C, N(0, sigma^2 C^2) per coordinate, / B",
        "hyperparameters": {"zo_eps": ZO_EPS, "lr": LR, "clip": CLIP, "noise_multiplier": SIGMA},
        "implementations": {
            "ours-central": "fused engine, central differences: 2K forwards, 2K+1 fused passes",
            "ours-forward": "fused engine, forward differences: K+1 forwards, K+1 fused passes",
            "mezo-style": "torch.manual_seed + torch.normal per tensor, +l/-2l/+l passes, one update pass per "
            "direction, full-vocabulary logits",
        },
        "targets": targets,
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    label = common.device_label(device)
    out = args.out or common.RESULTS_DIR / f"step_time_{label}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    if not gpu:
        print("CPU run: the code path is checked; the targets are GPU ratios (to be measured on a GPU)")
    print("\ntargets:")
    common.print_targets(targets, lambda m: "-" if m is None else f"{m:.3f}")
    print(f"wrote {out} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
