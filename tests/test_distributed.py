"""Scale-out on torch.distributed (gloo on the CPU): the layout changes the speed, never the result.

Every test starts real processes: ``torchrun``, or ranks started by hand with torchrun's
environment variables where a test needs each rank's own exit status. The runs train conftest's
tiny BERT on its CSV splits with a debug noise seed, so a 1-rank run and an N-rank run draw the
same batches and the same noise, and their ledgers can be compared.

Tolerance of the data axis (docs/distributed.md): a per-example loss computed in a batch of
another size or padding width differs in its last bits; the central difference divides that by
2λ, and clipping (1-Lipschitz) and summing pass it on to the released vector. We allow each
released coordinate a thousandth of the noise's standard deviation σC/(q·n), which every coordinate
carries anyway; measured differences are a few 1e-5 of it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpzo_engine.train import main as train_main
from dpzo_engine.zo.parallel import Layout, LayoutError

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, K, LR, CLIP, BATCH = 8, 4, 0.05, 1.0, 8
HERE = Path(__file__).resolve().parent
TIMEOUT = 300  # seconds for one job: start-up is slow on a loaded 2-core machine
Z_MAX = 5.7  # |z| of a Gaussian direction: r = sqrt(-2 ln u) with u >= 1e-7 (docs/design.md section 2)


def train_args(assets, out: Path, *extra: str) -> list[str]:
    model_dir, data_dir = assets
    return [
        "--model", str(model_dir), "--task", "local", "--data-dir", str(data_dir), "--trainable", "all",
        "--max-length", "16", "--batch-size", str(BATCH), "--steps", str(STEPS), "--num-directions", str(K),
        "--clip", str(CLIP), "--lr", str(LR), "--log-every", "2", "--save-every", "2", "--eval-batch-size", "32",
        "--noise-seed", "7", "--collective-timeout", "60", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, args: list[str], script: list[str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m dpzo_engine.train ARGS`` (or a script), waited for."""
    target = script if script is not None else ["-m", "dpzo_engine.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target, *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world: int, argv: list[str]) -> list[subprocess.Popen]:
    """The ranks of one job started by hand (as torchrun would), each with its own exit status and stderr."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        rank_env = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv], env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def ledger(out: Path) -> tuple[dict, list[dict]]:
    """(header, rows) without the checksum chain (it chains the header, whose layout differs by design)
    and without config_sha256 (config.json holds the layout flags and the output directory)."""
    rows = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("chain")
    rows[0].pop("config_sha256")
    return rows[0], rows[1:]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(next((out / "model").glob("*.safetensors")))


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:
    """The 1-rank run every layout must reproduce (a plain ``python -m dpzo_engine.train``, in-process)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, the same rounding
    try:
        with pytest.warns(UserWarning, match="NOT differentially private"):
            assert train_main(train_args(assets, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_direction_axis_is_bit_exact(assets, reference, tmp_path):
    out = tmp_path / "directions"
    job = torchrun(2, train_args(assets, out, "--parallel", "directions"))
    assert job.returncode == 0, job.stderr[-3000:]
    (head, rows), (ref_head, ref_rows) = ledger(out), ledger(reference)
    assert rows == ref_rows  # seeds, released vectors, coefficients, ε: bit for bit
    assert head.pop("layout") == {
        "parallel": "directions", "world_size": 2, "data_ranks": 1, "direction_ranks": 2, "passes": "all",
    }  # fmt: skip
    ref_head.pop("layout")
    assert head == ref_head
    ours, theirs = weights(out), weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    summary = json.loads((out / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert (
        summary["final_test"]["n"] == 32 and summary["final_test"]["accuracy"] == ref_summary["final_test"]["accuracy"]
    )
    assert summary["forwards"] == ref_summary["forwards"] == STEPS * 2 * K  # each forward ran on one rank
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "split" not in m]
    assert [m["step"] for m in steps] == list(range(2, STEPS + 1, 2))  # written once, by rank 0
    assert all(
        m["layout"]["world_size"] == 2 and m["comm_bytes_per_step"] > 0 and m["comm_seconds"] >= 0 for m in steps
    )
    assert job.stdout.count("fine-tuned") == 1  # the summary is printed by rank 0 alone


def test_direction_axis_is_bit_exact_on_a_lora_adapter(assets, tmp_path):
    """--peft lora under torchrun: the flat buffer is the adapter (and the classifier PEFT saves beside
    it), and 2 ranks splitting the directions release and save exactly what 1 rank does."""
    lora = ("--peft", "lora", "--lora-r", "2", "--trainable", "none", "--steps", "4")
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        with pytest.warns(UserWarning, match="NOT differentially private"):
            assert train_main(train_args(assets, one, *lora)) == 0
    finally:
        torch.set_num_threads(threads)
    job = torchrun(2, train_args(assets, two, *lora, "--parallel", "directions"))
    assert job.returncode == 0, job.stderr[-3000:]
    (head, rows), (ref_head, ref_rows) = ledger(two), ledger(one)
    assert rows == ref_rows and len(rows) == 4
    head.pop("layout"), ref_head.pop("layout")
    adapter, ref_adapter = weights(two), weights(one)
    assert head == ref_head and head["trainable_numel"] == sum(v.numel() for v in adapter.values())
    assert (two / "model" / "adapter_config.json").exists()
    assert adapter.keys() == ref_adapter.keys() and any("lora_" in k for k in adapter)
    assert all(torch.equal(adapter[k], ref_adapter[k]) for k in adapter)


@pytest.mark.parametrize(
    "nproc, layout",
    [(2, ["--parallel", "data"]), (4, ["--parallel", "2d", "--direction-ranks", "2"])],
    ids=["data", "2d"],
)
def test_data_axis_within_the_stated_tolerance(assets, reference, tmp_path, nproc, layout):
    out = tmp_path / "run"
    job = torchrun(nproc, train_args(assets, out, *layout))
    assert job.returncode == 0, job.stderr[-3000:]
    (_, rows), (ref_head, ref_rows) = ledger(out), ledger(reference)
    noise_std = ref_head["noise_multiplier"] * CLIP / ref_head["expected_batch_size"]
    tolerance = 1e-3 * noise_std
    assert len(rows) == len(ref_rows) == STEPS
    for row, ref in zip(rows, ref_rows):
        for key in ("step", "seeds", "rounding_seed", "zo_eps", "lr", "epsilon"):
            assert row[key] == ref[key], key  # public values and accounting do not depend on the layout
        worst = max(abs(a - b) for a, b in zip(row["released"], ref["released"]))
        assert worst <= tolerance, (row["step"], worst, tolerance)
    assert rows[0]["released"] == ref_rows[0]["released"]  # first step: θ equal, only the batch split differs
    ours, theirs = weights(out), weights(reference)
    for name in ours:
        drift = STEPS * (2 * K + 2) * 2.0**-23 * float(theirs[name].abs().max())  # passes rounding differently
        atol = STEPS * LR * K * tolerance * Z_MAX + drift
        assert torch.allclose(ours[name], theirs[name], rtol=0, atol=atol), name


def wait_for_checkpoint(out: Path, rank0: subprocess.Popen, after: int) -> int:
    """The step of the first checkpoint past step ``after`` (polled while rank 0 runs)."""
    latest = out / "checkpoint" / "LATEST"
    deadline = time.time() + TIMEOUT
    while rank0.poll() is None and time.time() < deadline:
        if latest.exists() and int(latest.read_text().strip().removeprefix("step-")) > after:
            return int(latest.read_text().strip().removeprefix("step-"))
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint after step {after}: {rank0.communicate()[1][-3000:]}")


def test_signal_kill_and_resume_on_other_rank_counts(assets, reference, tmp_path, capsys):
    """SIGTERM that reaches one rank stops every rank at the same step, with a checkpoint (exit 143
    everywhere); rank 0 alone holds the run's lock meanwhile. Resumed on 2 ranks, a killed rank ends
    the job (exit 1, no hang); resumed on 1 rank, the run ends as the 1-rank reference, bit for bit."""
    out = tmp_path / "run"
    slow = [str(HERE / "distributed_worker.py"), "slow", "0.5", "--"]  # time to signal between two steps
    ranks = start_ranks(2, [*slow, *train_args(assets, out, "--parallel", "directions")])
    wait_for_checkpoint(out, ranks[0], after=0)
    assert train_main(train_args(assets, out, "--resume")) == 2  # a second writer, refused before it reads
    assert f"is in use by another run (pid {ranks[0].pid}," in capsys.readouterr().err
    ranks[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns of it at the step's end
    outputs = [p.communicate(timeout=TIMEOUT) for p in ranks]
    assert [p.returncode for p in ranks] == [143, 143], outputs[0][1][-3000:]
    stopped = int((out / "checkpoint" / "LATEST").read_text().strip().removeprefix("step-"))
    assert f"interrupted (SIGTERM); checkpoint saved at step {stopped}; resume with" in outputs[0][1]
    assert "interrupted" not in outputs[1][1] and ledger(out)[1][-1]["step"] == stopped < STEPS
    assert not (out / ".lock").exists()

    ranks = start_ranks(2, [*slow, *train_args(assets, out, "--parallel", "directions", "--resume")])
    wait_for_checkpoint(out, ranks[0], after=stopped)
    ranks[1].kill()
    killed_at = time.time()
    _, err = ranks[0].communicate(timeout=TIMEOUT)
    ranks[1].wait()
    assert ranks[1].returncode == -9, "rank 1 finished before it could be killed"
    assert ranks[0].returncode == 1  # no hang: rank 0's next collective fails
    assert time.time() - killed_at < 60 and len(errors(err)) == 1 and "step" in errors(err)[0], err[-2000:]
    assert not (out / "summary.json").exists()

    assert train_main(train_args(assets, out, "--resume")) == 0  # the same run, now on one rank
    assert ledger(out)[1] == ledger(reference)[1]
    ours, theirs = weights(out), weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_corrupted_replica_is_caught_at_the_next_log_step(assets, tmp_path):
    out = tmp_path / "corrupted"
    script = [str(HERE / "distributed_worker.py"), "corrupt", "1", "3", "--"]  # rank 1, after step 3
    job = torchrun(2, train_args(assets, out, "--parallel", "directions"), script=script)
    assert job.returncode != 0
    lines = errors(job.stdout + job.stderr)
    assert lines == [
        "error: replicas diverged at step 4: the trainable parameters of rank(s) 1 differ from rank 0's "
        "(checksum mismatch)"
    ], job.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "ledger.jsonl").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]  # stopped at the check, before logging step 4's metrics


def test_bad_layout_is_one_line_from_rank_0_and_exit_2_everywhere(assets, tmp_path, monkeypatch, capsys):
    """Each rank's ``main`` as torchrun starts it (its environment), here in turn: the layout is checked
    before any rank joins the process group, so no rank waits for another."""
    argv = train_args(assets, tmp_path / "bad", "--parallel", "directions", "-K", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stderr = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert train_main(argv) == 2
        stderr.append(capsys.readouterr().err)
    assert errors(stderr[0]) == [
        "error: K = 3 directions cannot be split evenly over 2 direction ranks; choose -K as a multiple of 2"
    ]
    assert errors(stderr[1]) == [] and "Traceback" not in stderr[0] + stderr[1]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "mode, world, k, r, needle",
    [
        (None, 2, 4, None, "choose how to split the step with --parallel"),
        ("directions", 2, 3, None, "cannot be split evenly over 2 direction ranks"),
        ("directions", 8, 4, None, "cannot be split evenly over 8 direction ranks"),
        ("2d", 4, 4, None, "--parallel 2d needs --direction-ranks"),
        ("2d", 4, 4, 3, "must be a positive divisor of the world size 4"),
        ("2d", 4, 6, 4, "cannot be split evenly over 4 direction --direction-ranks"),
        ("data", 2, 4, 2, "--direction-ranks applies to --parallel 2d"),
        (None, 1, 4, 2, "--direction-ranks needs --parallel 2d"),
        ("rows", 2, 4, None, "--parallel must be one of data, directions, 2d"),
    ],
)
def test_layouts_the_job_cannot_use(mode, world, k, r, needle):
    with pytest.raises(LayoutError, match=needle.replace("(", r"\(")):
        Layout.make(mode, world, 0, k, r)


def test_layout_places_each_rank():
    layout = Layout.make("2d", 6, 5, 8, 2)  # 3 data ranks × 2 direction ranks
    assert (layout.data_index, layout.direction_index) == (2, 1)
    assert layout.directions(8) == range(4, 8)
    assert layout.direction_groups() == [[0, 1], [2, 3], [4, 5]] and layout.data_groups() == [[0, 2, 4], [1, 3, 5]]
    shares = [Layout.make("data", 3, rank, 1).share(list(range(7))) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]  # contiguous, sizes differ by at most one
    assert [Layout.make("data", 3, rank, 1).share([9]) for rank in range(3)] == [[9], [], []]
    single = Layout.make(None, 1, 0, 16)
    assert (
        single.directions(16) == range(16) and single.share([1, 2]) == [1, 2] and single.describe()["parallel"] is None
    )


def test_collectives_on_two_gloo_ranks():
    """zo.parallel's exchanges and checks, run.distributed's set-up agreement (tests/distributed_worker.py)."""
    ranks = start_ranks(2, [str(HERE / "distributed_worker.py"), "comm"])
    outputs = [p.communicate(timeout=TIMEOUT) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["rank 0: ok", "rank 1: ok"]


def test_scaling_benchmark_quick(tmp_path):
    """``bench/scaling.py --quick`` end to end (real torchrun jobs on a tiny BERT): the recorded CPU run's
    code path cannot rot between runs. Checks the output's shape and the replicas' agreement, not speed."""
    out = tmp_path / "scaling.json"
    job = subprocess.run(
        [sys.executable, str(HERE.parent / "bench" / "scaling.py"), "--quick", "--out", str(out)],
        env=env(), capture_output=True, text=True, timeout=3 * TIMEOUT,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {(r["axis"], r["ranks"]): r for r in doc["results"]}
    assert set(rows) == {(None, 1), ("directions", 2), ("data", 2)}
    for row in rows.values():
        assert row["replicas_identical"]["all"]  # the shipped mode: every rank holds the same θ
        assert row["all"]["step_s"] > 0 and row["trainable_numel"] == doc["setting"]["trainable_numel"]
    assert not rows[("directions", 2)]["replicas_identical"]["own"]  # what the mode we do not ship breaks
    assert all(s["comm_bytes"] > 0 for s in rows[("directions", 2)]["per_step"])
    assert out.with_suffix(".png").stat().st_size > 0 and "speed-up" in job.stdout
