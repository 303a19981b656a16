"""Step time and bytes communicated per step against the number of ranks, for each axis (scale-out).

Each configuration is a real job, ``torchrun --standalone --nproc-per-node N bench/scaling.py
--worker ...``: every rank builds the trainer's ``Session`` (model, task, privacy plan, the
``PrivateZO`` step of ``python -m dpzo_engine.train``) with its ``Comm``, and a fixed debug noise
seed, so that every configuration trains on the same Poisson batches. After ``--warmup`` steps it
times ``--steps`` steps. Rank 0 reports per step: wall time, time in forwards, in passes over θ and
in collectives, and the payload bytes of the collectives. Collective time is reported twice: rank
0's wall time inside the calls (waiting for a slower rank included) and the collectives' own cost
(per call, the least time any rank spent in it: the last rank to arrive waits for no one).

Every rank runs every pass over θ (the shipped mode: replicas stay bit-equal to each other and to
the 1-rank run). For the direction axis the job also times the mode we do not ship, "own passes":
each rank perturbs θ only along its own directions (2K/R + 1 passes instead of 2K + 1), on the same
batches. The job then compares the replicas' checksums: what that mode saves, and what it breaks.

    python bench/scaling.py                                # CPU: 1 and 2 ranks, one thread each
    python bench/scaling.py --device cuda --ranks 1,2,4,8  # one GPU per rank
    python bench/scaling.py --quick                        # a tiny model, seconds (code path only)
    python bench/scaling.py --steps 3 --trials 2           # the recorded CPU run (interleaved, fastest kept)
    python bench/scaling.py --replot bench/results/scaling_cpu-amd-epyc.json   # PNG and table again

Defaults: full MiniLM-L6 (``--model minilm --trainable all``, 22.7 M trainable parameters), K = 16,
central differences, Poisson batches of expected size 128 of real tweets (48 tokens at most).
Writes ``bench/results/scaling_<device>.json`` and ``.png``. Target (CPU): the direction axis at 2
ranks runs >= 1.8x the 1-rank step rate, with the collectives' own cost <= 2 % of the step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
AXES = ("directions", "data", "2d")
TARGET_SPEEDUP, TARGET_COMM_SHARE = 1.8, 0.02


# ----------------------------------------------------------------------------- the worker (one rank)
def train_flags(args: argparse.Namespace) -> list[str]:
    """The trainer flags of the benchmarked run (no output is written: the worker runs steps only)."""
    flags = [
        "--model", args.model, "--task", args.task, "--trainable", args.trainable, "-K", str(args.K),
        "--batch-size", str(args.batch_size), "--steps", str(args.warmup + 2 * args.steps), "--noise-seed", "1",
        "--device", args.device, "--output-dir", "/nonexistent", "--log-every", "1000000",
    ]  # fmt: skip
    if args.k_shot:
        flags += ["--k-shot", str(args.k_shot)]
    if args.max_length:
        flags += ["--max-length", str(args.max_length)]
    if args.axis:
        flags += ["--parallel", args.axis]
    if args.axis == "2d":
        flags += ["--direction-ranks", str(args.direction_ranks)]
    return flags


class Timer:
    """Wall seconds spent inside wrapped calls (device-synchronised on CUDA)."""

    def __init__(self, cuda: bool):
        self.cuda, self.seconds = cuda, 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            return out

        return timed


def own_passes_step(zo, loss_fn, step: int, forwards) -> None:
    """The mode not shipped: θ perturbed along this rank's directions only, then the whole update.

    2m + 1 passes for m = K/R own directions (the last restores my last direction and applies all K
    coefficients), the same collectives as the shipped step. Replicas round differently."""
    from dpzo_engine.core import stream
    from dpzo_engine.zo.rules import Released

    opts, comm, engine = zo.options, zo.comm, zo.engine
    lr, zo_eps = zo.stages.at(step)
    seeds = stream.step_seeds(opts.seed, step, opts.num_directions)
    own = [seeds[k] for k in comm.layout.directions(opts.num_directions)]
    with torch.no_grad(), forwards:
        D = comm.gather_directions(engine.estimate(loss_fn, own, zo_eps))
        clipped = comm.sum_over_data(zo.rule.clip(D))
        released = zo.rule.release(clipped) if comm.is_root else None
        released = Released.of(comm.from_root(released and released.grad, like=clipped.sums), clipped)
        coefs = (-lr * released.grad).to(torch.float32).tolist()
        restore = zo_eps if engine.difference == "central" else -zo_eps
        engine.apply([own[-1], *seeds], [restore, *coefs], opts.rounding, stream.rounding_seed(opts.seed, step))


def worker(args: argparse.Namespace) -> None:
    from dpzo_engine.run import distributed
    from dpzo_engine.run.config import parse_args
    from dpzo_engine.run.run_dir import RunDir
    from dpzo_engine.run.session import Session
    from dpzo_engine.zo.parallel import replica_checksum

    torch.set_num_threads(args.threads)
    cfg = parse_args(train_flags(args))
    comm = distributed.start(cfg)
    with tempfile.TemporaryDirectory() as scratch:  # set-up checks look at a directory; nothing is written
        s = Session(cfg, RunDir(scratch) if comm.is_root else distributed.ReplicaRun(scratch), False, comm)
    cuda = s.device.type == "cuda"
    fwd, passes = Timer(cuda), Timer(cuda)
    s.engine.apply = passes.wrap(s.engine.apply)
    rows, shares, sampled, call_s = [], [], [], []
    collective = comm._collective

    def timed_collective(*a, **kw):  # each collective's own wall time, to compare across ranks
        t0 = time.perf_counter()
        collective(*a, **kw)
        call_s.append(time.perf_counter() - t0)

    comm._collective = timed_collective
    if comm.is_root:  # keep the batches rank 0 draws, to broadcast them again in the "own passes" mode
        draw = s.plan.sampler.sample
        s.plan.sampler.sample = lambda: sampled.append(draw()) or sampled[-1]

    def run(step: int, mode: str) -> dict:
        fwd.seconds = passes.seconds = 0.0
        first_call = len(call_s)
        before = type(comm.stats)(**vars(comm.stats))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if mode == "all":
            shares.append(s.zo.sample())  # the batch broadcast is part of the step
        else:  # the same batch again, broadcast again
            comm.batch(sampled[step] if comm.is_root else None)
        idx = shares[step]
        loss_fn = s.loss_fn(idx)  # the trainer's own step forward; None for an empty share
        loss = None if loss_fn is None else fwd.wrap(loss_fn)
        if mode == "all":
            s.zo.step(loss, forwards=s.forwards())
        else:
            own_passes_step(s.zo, loss, step, s.forwards())
        comm.stop_signal(None)  # the training loop's per-step agreement on a stop signal
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        spent = comm.stats.minus(before)
        return dict(
            mode=mode,
            step=step + 1,
            examples_here=len(idx),
            wall_s=wall,
            forward_s=fwd.seconds,
            pass_s=passes.seconds,
            comm_s=spent.seconds,
            comm_bytes=spent.bytes,
            comm_calls=spent.calls,
            call_s=call_s[first_call:],
        )

    total = args.warmup + args.steps
    for step in range(total):
        row = run(step, "all")
        if step >= args.warmup:
            rows.append(row)
    identical = {"all": _replicas_identical(comm, s.flat.buffers, replica_checksum)}
    if args.axis in ("directions", "2d") and comm.layout.direction_ranks > 1:
        for step in range(args.warmup, total):  # the same batches, this time perturbing only my directions
            rows.append(run(step, "own"))
        identical["own"] = _replicas_identical(comm, s.flat.buffers, replica_checksum)
    _transfer_times(comm, rows)
    if comm.is_root:
        result = {"layout": comm.layout.describe(), "threads": torch.get_num_threads(), "device": str(s.device),
                  "trainable_numel": s.flat.numel, "replicas_identical": identical, "steps": rows}  # fmt: skip
        Path(args.worker).write_text(json.dumps(result))
    distributed.finish(comm, together=True)


def _transfer_times(comm, rows: list[dict]) -> None:
    """Per step, the collectives' own cost: for each call the least time any rank spent in it (the last
    rank to arrive does not wait for the others), summed; rank 0's rows get ``comm_transfer_s``."""
    if comm.world_size == 1:
        for r in rows:
            r["comm_transfer_s"] = 0.0
        return
    import torch.distributed as dist

    everyone = [None] * comm.world_size
    dist.all_gather_object(everyone, [r.pop("call_s") for r in rows])
    for i, r in enumerate(rows):
        calls = [ranks[i] for ranks in everyone]
        aligned = all(len(c) == len(calls[0]) for c in calls)
        r["comm_transfer_s"] = sum(min(c[j] for c in calls) for j in range(len(calls[0]))) if aligned else None


def _replicas_identical(comm, buffers, checksum) -> bool:
    """Whether every rank's θ has the same checksum as rank 0's (the replica check, without stopping)."""
    if comm.world_size == 1:
        return True
    import torch.distributed as dist

    mine = checksum(buffers)
    parts = [torch.empty_like(mine) for _ in range(comm.world_size)]
    dist.all_gather(parts, mine)
    return all(torch.equal(p, parts[0]) for p in parts)


# ----------------------------------------------------------------------------- the driver
def launch(args: argparse.Namespace, axis: str | None, ranks: int, out: Path) -> dict:
    """One configuration as a torchrun job; its rank 0's report."""
    flags = [
        "--worker", str(out), "--model", args.model, "--task", args.task, "--trainable", args.trainable,
        "-K", str(args.K), "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
        "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads),
        "--direction-ranks", str(args.direction_ranks),
    ]  # fmt: skip
    if axis:
        flags += ["--axis", axis]
    if args.k_shot:
        flags += ["--k-shot", str(args.k_shot)]
    if args.max_length:
        flags += ["--max-length", str(args.max_length)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    job = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if job.returncode != 0:
        raise SystemExit(f"error: {axis or 'single'} on {ranks} ranks failed:\n{job.stderr[-4000:]}")
    report = json.loads(out.read_text())
    report["job_seconds"] = round(time.time() - t0, 1)
    return report


def summarise(report: dict, mode: str) -> dict:
    rows = [r for r in report["steps"] if r["mode"] == mode]
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    step = mean("wall_s")
    return {
        "step_s": step,
        "step_s_median": statistics.median(r["wall_s"] for r in rows),
        "forward_s": mean("forward_s"),
        "pass_s": mean("pass_s"),
        "comm_s": mean("comm_s"),
        "comm_share": mean("comm_s") / step,
        "comm_transfer_s": mean("comm_transfer_s"),
        "comm_transfer_share": mean("comm_transfer_s") / step,
        "comm_bytes_per_step": mean("comm_bytes"),
        "examples_per_step_rank0": mean("examples_here"),
    }


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def plot(results: list[dict], path: Path, title: str) -> None:
    """Speed-up against ranks (each axis, and the pass mode not shipped) and bytes per step (ranks > 1:
    one rank sends nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    for axis in AXES:
        for mode, style in (("all", "-o"), ("own", ":x")):
            if mode == "own" and axis == "data":
                continue
            pts = sorted((r["ranks"], r[mode]["speedup"], r[mode]["comm_bytes_per_step"])
                         for r in results if r["axis"] == axis and mode in r)  # fmt: skip
            if not pts:
                continue
            label = f"{axis}" + (" (own passes: not shipped)" if mode == "own" else "")
            line = ax_rate.plot([1] + [p[0] for p in pts], [1.0] + [p[1] for p in pts], style, label=label)[0]
            if mode == "all":
                ax_bytes.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label, color=line.get_color())
    ranks = sorted({r["ranks"] for r in results})
    ax_rate.plot(ranks, ranks, "k--", lw=0.8, label="linear")
    ax_rate.set(xlabel="ranks", ylabel="step rate / 1-rank step rate", title="speed-up")
    ax_bytes.set(xlabel="ranks", ylabel="bytes per step (payload, rank 0)", title="communication", yscale="log")
    for ax in (ax_rate, ax_bytes):
        ax.set_xticks(ranks)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_title(doc: dict) -> str:
    s = doc["setting"]
    return (f"{s['model']} ({s['trainable']}), K = {s['K']}, batch {s['expected_batch']}, {doc['device']}, "
            f"{s['threads_per_rank']} thread(s) per rank")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="minilm")
    a("--task", default="tweet-sentiment")
    a("--trainable", default="all")
    a("-K", type=int, default=16)
    a("--batch-size", type=int, default=128)
    a("--k-shot", type=int, default=None)
    a("--max-length", type=int, default=None)
    a("--device", default="cpu")
    a("--ranks", default=None, help="rank counts, comma-separated [CPU: 1,2; CUDA: 1,2,4,8 up to the GPUs]")
    a("--axes", default=",".join(AXES))
    a("--direction-ranks", type=int, default=2, help="2d: ranks splitting the directions")
    a("--threads", type=int, default=1, help="torch threads per rank")
    a("--warmup", type=int, default=1)
    a("--steps", type=int, default=3)
    a("--trials", type=int, default=1, help="repeat every configuration, interleaved; the fastest trial counts")
    a("--quick", action="store_true", help="a tiny random BERT, K = 4, batch 8: the code path in seconds")
    a("--out", default=None)
    a("--replot", metavar="JSON", help="redraw the PNG and the table of a results JSON (nothing is run)")
    a("--worker", help=argparse.SUPPRESS)
    a("--axis", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.replot:
        doc = json.loads(Path(args.replot).read_text())
        plot(doc["results"], Path(args.replot).with_suffix(".png"), plot_title(doc))
        print_table(doc)
        return 0
    if args.quick:
        args.model, args.K, args.batch_size, args.steps, args.k_shot = _quick_model(), 4, 8, 2, 32
    device = torch.device(args.device)
    default_ranks = [1, 2] if device.type == "cpu" else [n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count()]
    ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else default_ranks
    axes = [x for x in args.axes.split(",") if x]
    configs = [(None, 1)] + [
        (axis, n) for n in ranks if n > 1 for axis in axes
        if not (axis == "2d" and (n <= args.direction_ranks or n % args.direction_ranks))
        and not (axis in ("directions",) and args.K % n) and not (axis == "2d" and args.K % args.direction_ranks)
    ]  # fmt: skip
    label = common.device_label(device)
    out = Path(args.out) if args.out else RESULTS_DIR / f"scaling_{label}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    t0 = time.time()
    trials: dict[tuple, list[dict]] = {c: [] for c in configs}
    for trial in range(args.trials):
        for axis, n in configs:
            print(f"trial {trial + 1}/{args.trials}: {axis or 'single'} on {n} rank(s) ...", flush=True)
            report = launch(args, axis, n, out.with_suffix(f".{axis or 'single'}{n}.part.json"))
            trials[(axis, n)].append(report)
            out.with_suffix(f".{axis or 'single'}{n}.part.json").unlink()
    results = []
    for (axis, n), reports in trials.items():
        # the fastest trial: on a shared machine another job only ever slows a trial down
        report = min(reports, key=lambda r: summarise(r, "all")["step_s"])
        entry = dict(
            axis=axis,
            ranks=n,
            layout=report["layout"],
            replicas_identical=report["replicas_identical"],
            trial_step_s=[summarise(r, "all")["step_s"] for r in reports],
            job_seconds=report["job_seconds"],
            trainable_numel=report["trainable_numel"],
            per_step=report["steps"],
            all=summarise(report, "all"),
        )
        if any(r["mode"] == "own" for r in report["steps"]):
            entry["own"] = summarise(report, "own")
        results.append(entry)
    base = next(r for r in results if r["ranks"] == 1)["all"]["step_s"]
    for r in results:
        for mode in ("all", "own"):
            if mode in r:
                r[mode]["speedup"] = base / r[mode]["step_s"]
    targets = []
    two = next((r for r in results if r["axis"] == "directions" and r["ranks"] == 2), None)
    if device.type == "cpu" and two is not None and not args.quick:
        targets = [
            {"name": "direction axis, 2 ranks: step rate vs 1 rank", "measured": two["all"]["speedup"],
             "rule": f">= {TARGET_SPEEDUP}x", "pass": two["all"]["speedup"] >= TARGET_SPEEDUP},
            {"name": "direction axis, 2 ranks: collectives' own time, share of the step",
             "measured": two["all"]["comm_transfer_share"], "rule": f"<= {TARGET_COMM_SHARE:.0%}",
             "pass": two["all"]["comm_transfer_share"] <= TARGET_COMM_SHARE},
        ]  # fmt: skip
    one = next(r for r in results if r["ranks"] == 1)
    doc = {
        "benchmark": "scaling",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": label,
        "cpu": common.cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "seconds": round(time.time() - t0, 1),
        "setting": {
            "model": args.model,
            "task": args.task,
            "trainable": args.trainable,
            "K": args.K,
            "expected_batch": args.batch_size,
            "trainable_numel": one.get("trainable_numel"),
            "threads_per_rank": args.threads,
            "warmup": args.warmup,
            "steps": args.steps,
            "trials": args.trials,
            "trial_kept": "fastest (step_s of the shipped mode); every trial's mean step time is in trial_step_s",
            "difference": "central",
        },
        "timing": "per step on rank 0: wall time from the batch broadcast to the end of the update; forwards, "
        "passes and collectives timed inside. comm_s: rank 0's time inside collectives, waiting for slower ranks "
        "included; comm_transfer_s: for each collective the least time any rank spent in it (the last rank to "
        "arrive waits for no one), summed: the collectives' own cost, which the target is about",
        "targets": targets,
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(results, out.with_suffix(".png"), plot_title(doc))
    print_table(doc)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if all(t["pass"] for t in targets) else 1


def print_table(doc: dict) -> None:
    head = ("ranks", "step s", "speed-up", "fwd s", "pass s", "comm %", "own comm %", "bytes/step")
    print(f"\n{'layout':<18}" + "".join(f"{h:>11}" for h in head))
    for r in doc["results"]:
        for mode in ("all", "own"):
            if mode not in r:
                continue
            m = r[mode]
            name = (r["axis"] or "single") + (" (own)" if mode == "own" else "")
            cells = (
                r["ranks"],
                f"{m['step_s']:.3f}",
                f"{m['speedup']:.2f}x",
                f"{m['forward_s']:.2f}",
                f"{m['pass_s']:.2f}",
                f"{100 * m['comm_share']:.2f}%",
                f"{100 * m['comm_transfer_share']:.2f}%",
                f"{m['comm_bytes_per_step']:.0f}",
            )
            print(f"{name:<18}" + "".join(f"{c:>11}" for c in cells))
    common.print_targets(doc["targets"], lambda v: f"{v:.3g}")


def _quick_model() -> str:
    """A tiny random BERT with MiniLM's tokenizer, saved once under the cache (the --quick model)."""
    from transformers import AutoTokenizer

    from dpzo_engine.core.paths import cache_dir
    from dpzo_engine.models.loading import build_random_model, minilm_dir

    path = cache_dir() / "scaling-tiny-bert"
    if not (path / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        model = build_random_model("bert", "tiny", num_labels=2, seed=0, vocab_size=tokenizer.vocab_size)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
