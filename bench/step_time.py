"""Time per DP-AggZO step and forwards per second: the engine against what users would run instead.

Why: the engine exists to be faster than the published ZO code. Three implementations of one
DP-AggZO step (K directions, per-example losses, joint K-space clip, Gaussian noise from the
secret generator, normalisation by the batch size, update), timed in the same run on the same
random-init model, batch and per-example losses:

(a) ours, central differences: fused passes over the flat buffer (2K forwards, 2K + 1 passes), the
    step's forwards through ``StepForward`` (mask and positions built once per step, label-word
    logits only, compiled when ``--compile`` says so);
(b) ours, forward differences (K + 1 forwards, K + 1 passes);
(c) MeZO-style, written here after MeZO's trainer: per direction ``torch.manual_seed(seed)`` then
    ``torch.normal`` per parameter tensor for each of the +λ / −2λ / +λ passes
    (``p.data = p.data + scale·λ·z``), a separate update pass per direction, and the published
    code's forward (``common.LabelWordLoss`` form ``published``: LM-BFF's MLM head at the mask over
    the full vocabulary for RoBERTa, full logits and a log-softmax over the vocabulary for OPT).

The clip, the noise and the update coefficients are the engine's ``PrivateRule`` for all three,
so only the implementation differs. Reported: median step time over interleaved repetitions (wall
and process CPU time, with their spread), the ratios (c)/(a) and (c)/(b), and, from one
instrumented step each (a device sync around every forward), the share of the step spent outside
the forward passes.

Forwards per second on the step's batch, interleaved: a plain ``model(**batch)`` loop, the published
code's forward, ours eager with the last block whole, ours eager, and ours compiled (its first call,
the compilation, timed apart).
``--profile`` adds where a forward's time goes (torch.profiler: matrix products, attention, other
ops, and the rest: Python and framework work outside the ops), the matrix products' GFLOP/s, and
those of one large matrix product on the same threads (what they could at best reach).

    python bench/step_time.py                # CUDA: OPT-1.3B and RoBERTa-large, K = 16 and 64, bf16
    python bench/step_time.py --device cpu   # CPU: RoBERTa-shaped 4.3 M model, all weights, fp32, K = 16
                                             # and 64, batch 16 x 32 tokens, one thread
    python bench/step_time.py --quick        # seconds: a tiny OPT, K = 2, eager forwards only

On a CPU the process keeps freed memory (``dpzo_engine.core.allocator``), as the trainer does; it
applies to all the implementations alike.

On a CPU it also measures, per K, what generating the default central step's 4K - 1 direction values
per weight costs on its own (``ops.directions``, best of 5), against the time the two CPU targets
together leave outside the forwards (MeZO-style step / 8, whatever the forwards cost): when the
generation alone is over that budget, no forward speed-up can meet both targets.

Writes ``bench/results/step_time_<device>.json`` and prints tables. Targets: GPU, (c)/(a) >= 2,
(c)/(b) >= 3.5, time outside the forwards <= 10% of our step; CPU (one thread), (c)/(a) >= 2 at
every K and time outside the forwards <= 25% of our central-difference step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import common
import torch
from torch import nn

from dpzo_engine import ops, privacy
from dpzo_engine.core import stream
from dpzo_engine.core.allocator import keep_freed_memory
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.models.step_forward import StepForward, resolve_compile
from dpzo_engine.zo.engine import ZOEngine
from dpzo_engine.zo.rules import PrivateRule

GPU_MODELS, CPU_MODELS, QUICK_MODELS = ["opt-1.3b", "roberta-large"], ["roberta-mini"], ["opt-small"]
GPU_DIRECTIONS, CPU_DIRECTIONS, QUICK_DIRECTIONS = (16, 64), (16, 64), (2,)
CPU_BATCH, CPU_LENGTH, QUICK_BATCH, QUICK_LENGTH = 16, 32, 2, 8
GPU_REPS, CPU_REPS = 3, 3
FORWARD_REPS, FORWARDS_PER_REP, PROFILED_FORWARDS = 7, 3, 5
ZO_EPS, LR, CLIP, SIGMA = 1e-3, 1e-6, 1.0, 1.0
MASTER_SEED = 0
TARGET_CENTRAL, TARGET_FORWARD, TARGET_OUTSIDE = 2.0, 3.5, 0.10  # GPU
TARGET_CPU_CENTRAL, TARGET_CPU_OUTSIDE = 2.0, 0.25  # CPU, one thread
IMPLEMENTATIONS = ("ours-central", "ours-forward", "ours-central-cached", "ours-central-rademacher", "mezo-style")
# Rademacher directions (±1 from single Philox bits): not the targets' algorithm (the published code draws
# Gaussians), timed beside it so that a user sees what the Gaussian transform costs in a step.
# ours-central-cached (CPU): the same step with a direction cache over every weight (--direction-cache-gb):
# the same bits for one fp32 copy of the weights more memory, 2K - 1 direction values per weight instead of 4K - 1.
GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul", "aten::addbmm")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``, device-synchronised."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def best_seconds(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Best wall time of ``fn()`` over ``reps`` runs after one warm-up: the closest to the machine's speed."""
    fn()
    return min(timed(fn, device)[0] for _ in range(reps))


def summary(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": list(values)}


class ForwardClock:
    """Adds up the wall time of the forwards it wraps (with a device sync on each side) when on."""

    def __init__(self, device: torch.device):
        self.device, self.on, self.seconds, self.count = device, False, 0.0, 0

    def wrap(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def clocked() -> torch.Tensor:
            if not self.on:
                return fn()
            sync(self.device)
            start = time.perf_counter()
            out = fn()
            sync(self.device)
            self.seconds += time.perf_counter() - start
            self.count += 1
            return out

        return clocked


def private_rule(k: int, batch_size: int, backend: str) -> PrivateRule:
    """DP-AggZO's release: joint clip in K-space, N(0, σ²C²) per coordinate from the secret generator, / B."""
    mechanism = privacy.GaussianMechanism(SIGMA, CLIP, k, "joint", generator=privacy.secret_generator())
    return PrivateRule(mechanism, float(batch_size), backend=backend)


class OursStep:
    """One DP-AggZO step on the fused engine (the trainer's step without its logging): the batch is
    bound once per step (``StepForward.bind``), its forwards then run 2K (or K + 1) times."""

    def __init__(
        self,
        flat: FlatParams,
        forward: StepForward,
        batch: dict,
        k: int,
        difference: str,
        clock,
        kind: str = "gaussian",
        cache_bytes: int = 0,
    ):
        self.flat, self.forward, self.batch, self.clock = flat, forward, batch, clock
        self.engine = ZOEngine(flat, kind, "auto", difference, cache_bytes=cache_bytes)
        self.rule = private_rule(k, len(batch["labels"]), self.engine.backend)
        self.k = k
        self.rounding = "stochastic" if self.flat.buffers[0].dtype == torch.bfloat16 else "nearest"

    def direction_values_per_weight(self) -> float:
        """Direction values generated per weight and step so far (the engine's counter)."""
        steps = self.engine.counter.passes / (2 * self.k + 1 if self.engine.difference == "central" else self.k + 1)
        weights = sum(b.numel() for b in self.flat.buffers)
        return self.engine.counter.direction_values / (weights * steps) if steps else 0.0

    def __call__(self, t: int) -> None:
        seeds = stream.step_seeds(MASTER_SEED, t, self.k)
        with torch.no_grad():
            loss = self.clock.wrap(self.forward.bind(self.batch))
            D = self.engine.estimate(loss, seeds, ZO_EPS)
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


def generation_floor(flat: FlatParams, backend: str, k: int, mezo_step_s: float, forward_s: float) -> dict:
    """What generating the default step's direction values costs on its own, against the time the CPU targets
    leave outside the forwards (measured in this run, on these threads).

    ``ops.directions`` writes one direction over every weight (best of 5: the closest to the machine's
    speed, so the floor errs low); the default central step generates 4K - 1 values per weight (the
    minimum without a cache: each direction is entered, flipped and left around a forward, then applied).
    Both targets together need outside <= 25% of a step <= MeZO-style / 2, so outside <= MeZO-style / 8
    whatever the forwards cost; with this run's forwards F, 2x alone needs outside <= MeZO-style / 2 - F
    and 25% alone outside <= F / 3."""
    weights = sum(b.numel() for b in flat.buffers)
    out = torch.empty(weights)
    best = best_seconds(
        lambda: ops.directions(MASTER_SEED, 0, weights, "gaussian", backend=backend, out=out), torch.device("cpu")
    )
    values = 4 * k - 1
    floor = values * best
    budget = mezo_step_s / (TARGET_CPU_CENTRAL / TARGET_CPU_OUTSIDE)
    return {
        "backend": backend,
        "ns_per_value": 1e9 * best / weights,
        "central_values_per_weight": values,
        "central_generation_s": floor,
        "mezo_style_step_s": mezo_step_s,
        "ours_central_forward_s": forward_s,
        "outside_budget_both_targets_s": budget,
        "generation_within_both_targets_budget": floor <= budget,
        "outside_budget_2x_with_these_forwards_s": mezo_step_s / TARGET_CPU_CENTRAL - forward_s,
        "outside_budget_share_with_these_forwards_s": forward_s * TARGET_CPU_OUTSIDE / (1 - TARGET_CPU_OUTSIDE),
    }


def time_rounds(fns: dict[str, Callable[[int], object]], reps: int, device: torch.device, t0: int) -> dict:
    """Interleaved repetitions (each function once per round): {name: ([wall s], [cpu s])}."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    t = t0
    for _ in range(reps):
        for name, fn in fns.items():
            wall, cpu = timed(lambda fn=fn, t=t: fn(t), device)
            out[name][0].append(wall)
            out[name][1].append(cpu)
            t += 1
    return out


# ----------------------------------------------------------------------------- forwards per second


def forward_variants(model: nn.Module, batch: dict, masked: bool, label_words, device, compiled: bool) -> dict:
    """name -> (loss function of the batch, the StepForward behind it or None). Built on the same model."""
    plain = common.LabelWordLoss(masked, label_words, "plain")
    published = common.LabelWordLoss(masked, label_words, "published")
    ours = common.LabelWordLoss(masked, label_words, "ours")

    def step_forward(mode: str, trim: bool = True) -> StepForward:
        loss = lambda b: ours.per_example_loss(model, b)  # noqa: E731
        return StepForward(
            loss, device, mode, prepare=lambda b: ours.prepare(model, b), model=model,
            read_positions=ours.read_positions if trim else None,
        )  # fmt: skip

    variants = {
        "plain": (lambda: plain.per_example_loss(model, batch), None),
        "published": (lambda: published.per_example_loss(model, batch), None),
    }
    whole = step_forward("off", trim=False)
    variants["ours-whole-block"] = (whole.bind(batch), whole)
    eager = step_forward("off")
    variants["ours-eager"] = (eager.bind(batch), eager)
    if compiled:
        comp = step_forward("on")
        variants["ours-compiled"] = (comp.bind(batch), comp)
    return variants


def bench_forwards(variants: dict, device: torch.device) -> dict:
    """Per-forward wall and CPU seconds of each variant (interleaved rounds of FORWARDS_PER_REP calls),
    forwards per second, and the compiled variant's first call (its compilation)."""
    out: dict[str, dict] = {}
    with torch.no_grad():
        for name, (fn, forward) in variants.items():  # warm-up; the compiled variant compiles here
            wall, cpu = timed(fn, device)
            out[name] = {"first_call_s": wall, "first_call_cpu_s": cpu}  # CPU: this process's threads only
            if forward is not None and forward.compiled:
                out[name]["compile_s"] = forward.stats.first_call_s
        walls: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(FORWARD_REPS):
            for name, (fn, _) in variants.items():

                def several(fn=fn):
                    for _ in range(FORWARDS_PER_REP):
                        fn()

                wall, cpu = timed(several, device)
                walls[name].append(wall / FORWARDS_PER_REP)
                cpus[name].append(cpu / FORWARDS_PER_REP)
    for name in variants:
        out[name] |= {
            "forward_s": summary(walls[name]),
            "forward_cpu_s": summary(cpus[name]),
            "forwards_per_s": 1 / statistics.median(walls[name]),
            "forwards_per_cpu_s": 1 / statistics.median(cpus[name]),
        }
    for name in variants:
        for ref in ("plain", "published"):
            out[name][f"speedup_vs_{ref}"] = out[ref]["forward_cpu_s"]["median"] / out[name]["forward_cpu_s"]["median"]
    return out


def profile_forwards(variants: dict, device: torch.device) -> dict:
    """Where a forward's time goes (torch.profiler, self times per forward): matrix products, attention,
    other ops, and what is outside any op (Python, framework work; inflated a little by the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    with torch.no_grad():
        for name, (fn, _) in variants.items():
            fn()
            with profile(activities=activities, with_flops=True) as prof:
                start = time.perf_counter()
                for _ in range(PROFILED_FORWARDS):
                    fn()
                sync(device)
                wall = (time.perf_counter() - start) / PROFILED_FORWARDS
            events = prof.key_averages()
            per_op = {e.key: e.self_cpu_time_total / 1e6 / PROFILED_FORWARDS for e in events}
            gemm = sum(v for k, v in per_op.items() if k in GEMM_OPS)
            gemm_flops = sum(e.flops for e in events if e.key in GEMM_OPS) / PROFILED_FORWARDS
            attention = sum(v for k, v in per_op.items() if "scaled_dot_product" in k or "attention" in k)
            in_ops = sum(per_op.values())
            top = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
            out[name] = {
                "wall_s": wall,
                "matrix_products_s": gemm,
                # the profiler's count (2 m n k per product); None where the products run outside aten
                # (a compiled graph's own kernels)
                "matrix_products_gflop": gemm_flops / 1e9 if gemm_flops else None,
                "matrix_products_gflop_per_s": gemm_flops / gemm / 1e9 if gemm_flops and gemm else None,
                "attention_s": attention,
                "other_ops_s": in_ops - gemm - attention,
                "outside_ops_s": max(0.0, wall - in_ops),
                "top_ops": [{"op": k, "s": v, "share": v / wall} for k, v in top],
            }
    return out


def sgemm_rate(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    """GFLOP/s of one large square matrix product on this run's threads: the rate the forwards' matrix
    products could at best reach (best of 5)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / best_seconds(lambda: torch.mm(a, b), device) / 1e9


# ----------------------------------------------------------------------------- one model


def bench_model(
    name: str,
    directions: Sequence[int],
    batch_size: int,
    length: int,
    reps: int,
    device: torch.device,
    dtype: torch.dtype,
    compile: str = "off",
    profile: bool = False,
    compiled_forwards: bool | None = None,
    rademacher: bool = False,
    cached: bool = False,
) -> dict:
    """Forwards per second, then the three step implementations at each K, on one random-init model.
    ``compile``: our step's forwards, as the trainer's ``--compile`` (``main`` passes its ``--compile``,
    default auto; the default here, off, keeps callers on a time budget, ``gpu_check``'s step part, free of
    a compilation); ``compiled_forwards``: time a compiled forward in the forwards table too (None: when
    the step compiles); ``rademacher``: add our central step with Rademacher directions; ``cached``: add it
    with a direction cache over every weight (C++ CPU backend)."""
    arch = common.MODELS[name][0]
    masked = arch == "roberta"
    head = "mlm-prompt" if masked else "causal-prompt"
    ours_model = common.build_model(name, head, dtype, device, seed=0)
    mezo_model = common.build_model(name, head, dtype, device, seed=0)
    batch = common.prompt_batch(ours_model, batch_size, length, masked)
    vocab = ours_model.config.vocab_size
    label_words = (vocab // 4, vocab // 2)  # two vocabulary ids standing for " terrible" / " great"
    ours_loss = common.LabelWordLoss(masked, label_words, "ours")
    mezo_loss = common.LabelWordLoss(masked, label_words, "published")
    with torch.no_grad():
        a = ours_loss.per_example_loss(ours_model, ours_loss.prepare(ours_model, batch))
        b = mezo_loss.per_example_loss(mezo_model, batch)
        c = common.LabelWordLoss(masked, label_words, "plain").per_example_loss(mezo_model, batch)
    out = {
        "model": name,
        "loss": "label words" + (" at the mask (masked LM)" if masked else " at the last token (causal LM)"),
        "batch": batch_size,
        "length": length,
        "parameters": sum(p.numel() for p in ours_model.parameters()),
        "vocabulary": vocab,
        # the same per-example losses from the three forms of the forward
        "loss_max_abs_difference": max(float((a - b).abs().max()), float((a - c).abs().max())),
        "rows": [],
    }
    flat = FlatParams(ours_model)  # once: the parameters become views of one buffer per dtype
    step_compiled = resolve_compile(compile, device)  # what the trainer would do with --compile
    compiled_forwards = step_compiled or bool(compiled_forwards)
    variants = forward_variants(ours_model, batch, masked, label_words, device, compiled_forwards)
    out["forwards"] = bench_forwards(variants, device)
    if profile:
        out["profile"] = profile_forwards(variants, device)
        out["sgemm_2048_gflop_per_s"] = sgemm_rate(device, dtype)
    clock = ForwardClock(device)
    ours_forward = variants["ours-compiled" if step_compiled else "ours-eager"][1]  # compiled once, reused
    out["ours_compiled"] = step_compiled
    for k in directions:
        steps = {
            "ours-central": OursStep(flat, ours_forward, batch, k, "central", clock),
            "ours-forward": OursStep(flat, ours_forward, batch, k, "forward", clock),
            "mezo-style": MeZOStyleStep(mezo_model, mezo_loss, batch, k, clock),
        }
        if rademacher:
            steps["ours-central-rademacher"] = OursStep(flat, ours_forward, batch, k, "central", clock, "rademacher")
        if cached:
            whole = 4 * sum(b.numel() for b in flat.buffers)
            steps["ours-central-cached"] = OursStep(flat, ours_forward, batch, k, "central", clock, cache_bytes=whole)
        time_rounds(steps, 1, device, t0=0)  # warm-up: kernels compiled, caches filled
        times = time_rounds(steps, reps, device, t0=1)
        instrumented = {}
        for impl, step in steps.items():
            clock.on, clock.seconds, clock.count = True, 0.0, 0
            total = time_rounds({impl: step}, 1, device, t0=100)[impl][0][0]
            clock.on = False
            instrumented[impl] = {"step_s": total, "forward_s": clock.seconds, "forwards": clock.count}
        wall = {impl: summary(v[0]) for impl, v in times.items()}
        cpu = {impl: summary(v[1]) for impl, v in times.items()}
        if device.type == "cpu":
            out.setdefault("generation_floor", []).append(
                {"K": k}
                | generation_floor(
                    flat, steps["ours-central"].engine.backend, k, wall["mezo-style"]["median"],
                    instrumented["ours-central"]["forward_s"],
                )
            )  # fmt: skip
        for impl in (i for i in IMPLEMENTATIONS if i in steps):
            ins = instrumented[impl]
            out["rows"].append(
                {
                    "K": k,
                    "implementation": impl,
                    "step_s": wall[impl]["median"],
                    "step_wall_s": wall[impl],
                    "step_cpu_s": cpu[impl],
                    "forwards_per_step": ins["forwards"],
                    "passes_per_step": (2 * k + 1 if impl.startswith("ours-central") else k + 1)
                    if impl.startswith("ours")
                    else 4 * k,
                    "instrumented_step_s": ins["step_s"],
                    "instrumented_forward_s": ins["forward_s"],
                    "outside_forward_share": 1 - ins["forward_s"] / ins["step_s"],
                    "speedup_vs_mezo_style": wall["mezo-style"]["median"] / wall[impl]["median"],
                    "direction_values_per_weight": steps[impl].direction_values_per_weight()
                    if impl.startswith("ours")
                    else 4 * k,
                    "direction_cache_mb": steps[impl].engine.cache_nbytes / 1e6 if impl.startswith("ours") else 0.0,
                    "cpu_speedup_vs_mezo_style": cpu["mezo-style"]["median"] / cpu[impl]["median"],
                    # spread of the ratio: per-round ratios of the interleaved repetitions
                    "round_speedups": [m / o for m, o in zip(wall["mezo-style"]["all"], wall[impl]["all"])],
                }
            )
    return out


# ----------------------------------------------------------------------------- targets and output


def evaluate_targets(models: list[dict], gpu: bool, cpu: bool = False) -> list[dict]:
    """The GPU targets (judged when ``gpu``) and the CPU ones (judged when ``cpu``: a full one-thread CPU run)."""

    def target(name: str, values: list[float], threshold: float, rule: str, at_least: bool, judged: bool) -> dict:
        worst = (min(values) if at_least else max(values)) if values else None
        ok = None if worst is None or not judged else bool(worst >= threshold if at_least else worst <= threshold)
        return {"name": name, "measured": worst, "threshold": threshold, "rule": rule, "pass": ok}

    rows = [r | {"model": m["model"]} for m in models for r in m["rows"]]
    central = [r["speedup_vs_mezo_style"] for r in rows if r["implementation"] == "ours-central"]
    forward = [r["speedup_vs_mezo_style"] for r in rows if r["implementation"] == "ours-forward"]
    outside = [r["outside_forward_share"] for r in rows if r["implementation"] in ("ours-central", "ours-forward")]
    outside_central = [r["outside_forward_share"] for r in rows if r["implementation"] == "ours-central"]
    cached = [r["speedup_vs_mezo_style"] for r in rows if r["implementation"] == "ours-central-cached"]
    outside_cached = [r["outside_forward_share"] for r in rows if r["implementation"] == "ours-central-cached"]
    return [
        target("MeZO-style / ours (central differences), worst case", central, TARGET_CENTRAL, ">= 2x", True, gpu),
        target("MeZO-style / ours (forward differences), worst case", forward, TARGET_FORWARD, ">= 3.5x", True, gpu),
        target("share of our step outside the forward passes, worst case", outside, TARGET_OUTSIDE, "<= 10%", False,
               gpu),
        target("CPU, one thread: MeZO-style / ours (central differences), worst K", central, TARGET_CPU_CENTRAL,
               ">= 2x", True, cpu),
        target("CPU, one thread: our central step outside the forward passes, worst K", outside_central,
               TARGET_CPU_OUTSIDE, "<= 25%", False, cpu),
        target("CPU, one thread, with the direction cache (+4 bytes per weight): MeZO-style / ours, worst K",
               cached, TARGET_CPU_CENTRAL, ">= 2x", True, cpu and bool(cached)),
        target("CPU, one thread, with the direction cache: outside the forward passes, worst K", outside_cached,
               TARGET_CPU_OUTSIDE, "<= 25%", False, cpu and bool(cached)),
    ]  # fmt: skip


def print_table(models: list[dict]) -> None:
    for m in models:
        print(f"\n{m['model']} ({m['parameters'] / 1e6:.1f} M parameters), batch {m['batch']} x {m['length']} tokens")
        print(f"{'forward':>16} {'ms':>8} {'cpu ms':>8} {'fwd/s':>7} {'vs plain':>8} {'vs published':>12}")
        for name, f in m["forwards"].items():
            print(
                f"{name:>16} {1e3 * f['forward_s']['median']:>8.2f} {1e3 * f['forward_cpu_s']['median']:>8.2f}"
                f" {f['forwards_per_s']:>7.1f} {f['speedup_vs_plain']:>7.2f}x {f['speedup_vs_published']:>11.2f}x"
                + (f"  (compile {f['compile_s']:.1f} s)" if "compile_s" in f else "")
            )
        for name, p in m.get("profile", {}).items():
            parts = ", ".join(
                f"{key.removesuffix('_s').replace('_', ' ')} {100 * p[key] / p['wall_s']:.0f}%"
                for key in ("matrix_products_s", "attention_s", "other_ops_s", "outside_ops_s")
            )
            rate = p.get("matrix_products_gflop_per_s")
            rate_text = f"; matrix products at {rate:.0f} GFLOP/s" if rate else ""
            print(f"  profile {name}: {1e3 * p['wall_s']:.2f} ms = {parts}{rate_text}")
        if "sgemm_2048_gflop_per_s" in m:
            print(
                f"  a 2048 x 2048 x 2048 matrix product on the same threads: {m['sgemm_2048_gflop_per_s']:.0f} GFLOP/s"
            )
        header = ("K", "implementation", "step s", "cpu s", "vs MeZO", "spread", "outside fwd")
        print(" ".join(f"{h:>{w}}" for h, w in zip(header, (3, 23, 9, 9, 8, 13, 11))))
        for r in m["rows"]:
            spread = f"{min(r['round_speedups']):.2f}-{max(r['round_speedups']):.2f}"
            print(
                f"{r['K']:>3} {r['implementation']:>23} {r['step_s']:>9.4f} {r['step_cpu_s']['median']:>9.4f}"
                f" {r['speedup_vs_mezo_style']:>7.2f}x {spread:>13} {100 * r['outside_forward_share']:>10.1f}%"
            )
        for g in m.get("generation_floor", []):
            verdict = (
                "within it (necessary, not sufficient)"
                if g["generation_within_both_targets_budget"]
                else "over it: out of reach whatever the forwards cost"
            )
            print(
                f"K={g['K']}: generating the default step's {g['central_values_per_weight']} values per weight takes"
                f" >= {g['central_generation_s']:.3f} s ({g['ns_per_value']:.2f} ns each, {g['backend']});"
                f" both CPU targets allow {g['outside_budget_both_targets_s']:.3f} s outside the forwards"
                f" (MeZO-style step / 8): {verdict}"
            )


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda[:i] or cpu")
    p.add_argument("--models", help=f"comma-separated, from {', '.join(common.MODELS)}")
    p.add_argument("--directions", help="K values [16,64; 2 quick]")
    p.add_argument("--batch-size", type=int, help="examples per step [the SST-2 setting on CUDA; 16 on CPU]")
    p.add_argument("--seq-len", type=int, help="tokens per example [the SST-2 setting on CUDA; 32 on CPU]")
    p.add_argument("--dtype", help="model dtype [bfloat16 on CUDA, float32 on CPU]")
    p.add_argument("--threads", type=int, help="intra-op threads [1 on CPU: the issue's setting; torch's on CUDA]")
    p.add_argument("--reps", type=int, help=f"timed repetitions per implementation [{GPU_REPS}]")
    p.add_argument("--compile", default="auto", help="our step's forwards: auto (on for CUDA), on, off [auto]")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown of one forward")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny OPT, K = 2, two examples, eager forwards")
    p.add_argument("--out", type=Path, help="JSON path [bench/results/step_time_<device>.json]")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    resolve_compile(args.compile, device)  # a bad value fails here, before any model is built
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
    threads = args.threads or (None if gpu else 1)
    if threads:
        torch.set_num_threads(threads)
    malloc_tuned = keep_freed_memory() if not gpu else False  # as the trainer does on a CPU (both sides share it)
    if threads == 1:  # inductor's C++ builds in this process too: the compilation's CPU time is then measured
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    cold = None
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold compilation, as a user's first run pays it
        cold = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="step_time_inductor_")
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = []
    for name in models:
        setting = common.setting_for("sst2", name)
        batch = args.batch_size or (QUICK_BATCH if args.quick else setting.batch if gpu else CPU_BATCH)
        length = args.seq_len or (QUICK_LENGTH if args.quick else setting.length if gpu else CPU_LENGTH)
        results.append(
            bench_model(
                name, directions, batch, length, reps, device, dtype, args.compile, args.profile,
                compiled_forwards=not args.quick and args.compile != "off", rademacher=True, cached=not gpu,
            )
        )  # fmt: skip
        if gpu:
            torch.cuda.empty_cache()
    if cold is not None:
        shutil.rmtree(cold, ignore_errors=True)
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    targets = evaluate_targets(results, gpu, cpu=not gpu and not args.quick)
    report = {
        "benchmark": "step_time",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if gpu else None,
        "cpu": common.cpu_name(),
        "threads": torch.get_num_threads(),
        "malloc_keeps_freed_memory": malloc_tuned,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "triton": common.triton_version(),
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "reps": reps,
        "compile": args.compile,
        "timing": "median of interleaved repetitions, device-synchronised, wall and process CPU time; forward "
        "share from one instrumented step per implementation (sync around each forward)",
        "algorithm": "DP-AggZO: per-example losses, joint K-space clip C, N(0, sigma^2 C^2) per coordinate, / B",
        "hyperparameters": {"zo_eps": ZO_EPS, "lr": LR, "clip": CLIP, "noise_multiplier": SIGMA},
        "implementations": {
            "ours-central": "fused engine, central differences: 2K forwards, 2K+1 fused passes",
            "ours-forward": "fused engine, forward differences: K+1 forwards, K+1 fused passes",
            "ours-central-cached": "as ours-central with a direction cache over every weight (one fp32 copy of "
            "the weights more memory; the same bits): 2K-1 direction values per weight instead of 4K-1",
            "ours-central-rademacher": "as ours-central with Rademacher directions (not the targets' algorithm: "
            "shows what the Gaussian transform costs)",
            "mezo-style": "torch.manual_seed + torch.normal per tensor, +l/-2l/+l passes, one update pass per "
            "direction, the published code's forward",
        },
        "forward_variants": {
            "plain": "model(**batch): full [B, T, V] logits, masks and positions built inside the call",
            "published": "the published code's forward: RoBERTa, MLM head at the mask over the full vocabulary "
            "(LM-BFF); OPT, full logits and a log-softmax over the vocabulary (MeZO)",
            "ours-whole-block": "StepForward, eager: mask and positions built once per step, label-word rows only",
            "ours-eager": "as ours-whole-block, and the last block at the read position only (models.last_block)",
            "ours-compiled": "StepForward under torch.compile (symbolic shapes; CUDA graphs on GPU)",
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
    print(f"\nload average before/after: {load_before[0]:.2f} / {report['load_average_after'][0]:.2f}")
    print("targets:")
    common.print_targets(targets, lambda m: "-" if m is None else f"{m:.3f}")
    print(f"wrote {out} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
