"""DP-ZOSO and DP-ZOPO end to end: proximal pull, the CLI, replay, resume, privacy accounting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dpzo_engine import ops
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.replay import main as replay_main
from dpzo_engine.run import journal
from dpzo_engine.run.run_dir import read_jsonl
from dpzo_engine.run.session import Session
from dpzo_engine.train import main as train_main
from dpzo_engine.zo.pruning import Mask
from dpzo_engine.zo.stagewise import ProximalAnchor

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


# ----------------------------------------------------------------------------- proximal pull
def linear_flat(n: int, dtype=torch.float32) -> FlatParams:
    model = nn.Linear(n, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.linspace(-1, 1, n).reshape(1, n))
    return FlatParams(model)


def test_proximal_pull_is_the_proximal_map_towards_the_stage_start():
    flat = linear_flat(1000)
    (buf,) = flat.buffers
    prox = ProximalAnchor(flat, rho=0.5, rounding="nearest", master_seed=0, chunk=128)
    prox.reset(None)
    anchor = buf.clone()
    assert prox.nbytes == 4000  # DP-ZOSO: a full copy of the trainable parameters, stated in the docs
    buf.add_(0.25)  # the stage's updates so far
    x = buf.clone()
    prox.pull(step=3, lr=0.2)
    w = torch.tensor(0.2 * 0.5 / (1 + 0.2 * 0.5), dtype=torch.float32)
    assert torch.equal(buf, x + w * (anchor - x))  # θ ← (θ + ηρ θ_s) / (1 + ηρ), fp32, one rounding


def test_masked_anchor_holds_only_the_masked_coordinates():
    flat = linear_flat(1000)
    (buf,) = flat.buffers
    keep = torch.zeros(1000, dtype=torch.bool)
    keep[::97] = True
    mask = Mask([ops.pack_mask(keep)], int(keep.sum()), 1000)
    prox = ProximalAnchor(flat, rho=1.0, rounding="nearest", master_seed=0, chunk=64)
    prox.reset(mask)
    assert prox.nbytes == 4 * int(keep.sum())  # 1% of the copy DP-ZOSO would need
    assert torch.equal(prox.anchor[0], buf[keep])
    start = buf.clone()
    buf.add_(1.0)
    moved = buf.clone()
    prox.pull(step=0, lr=0.5)
    assert torch.equal(buf[~keep], moved[~keep])  # unmasked coordinates are never touched
    w = torch.tensor(0.5 / 1.5, dtype=torch.float32)
    assert torch.equal(buf[keep], moved[keep] + w * (start[keep] - moved[keep]))


def test_bf16_pull_is_unbiased_with_stochastic_rounding():
    flat = linear_flat(100_000, torch.bfloat16)
    (buf,) = flat.buffers
    buf.fill_(1.0)
    prox = ProximalAnchor(flat, rho=1.0, rounding="stochastic", master_seed=0)
    prox.reset(None)
    prox.anchor[0].zero_()
    prox.pull(step=0, lr=1e-4)  # a pull of 1e-4 is 1/80 of a bf16 ulp at 1.0
    assert float(buf.float().mean()) == pytest.approx(1 - 1e-4 / (1 + 1e-4), abs=1e-5)
    nearest = ProximalAnchor(flat, rho=1.0, rounding="nearest", master_seed=0)
    buf.fill_(1.0)
    nearest.reset(None)
    nearest.anchor[0].zero_()
    nearest.pull(step=0, lr=1e-4)
    assert bool((buf == 1.0).all())  # what stochastic rounding is for


# ----------------------------------------------------------------------------- CLI
def args(assets, out: Path, *extra: str) -> list[str]:
    model_dir, data_dir = assets
    return [
        "--model", str(model_dir), "--task", "local", "--data-dir", str(data_dir), "--trainable", "all",
        "--max-length", "16", "--batch-size", "8", "--steps", "7", "-K", "2", "--clip", "1.0",
        "--lr", "0.05", "--log-every", "7", "--save-every", "100", "--eval-batch-size", "32",
        "--max-eval-examples", "8", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def ledger(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(next((out / "model").glob("*.safetensors")))


def test_dp_zoso_schedule_prox_and_replay(assets, tmp_path):
    out = tmp_path / "zoso"
    extra = ("--method", "dp-zoso", "--stages", "3", "--zo-scale-start", "1e-2", "--zo-scale-end", "1e-4")
    assert train_main(args(assets, out, *extra, "--prox", "0.5")) == 0
    rows = ledger(out)
    header, stages, steps = rows[0], [r for r in rows if r["type"] == "stage"], [r for r in rows if r["type"] == "step"]
    assert [s["start"] for s in header["stages"]] == [0, 1, 3] and header["clip_mode"] == "joint"
    assert [s["step"] for s in stages] == [1, 2, 4] and all("mask" not in s for s in stages)
    assert [r["lr"] for r in steps] == [0.05, 0.025, 0.025, 0.0125, 0.0125, 0.0125, 0.0125]
    assert [r["zo_eps"] for r in steps] == pytest.approx([1e-2, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4], rel=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra_memory"]["anchor_bytes"] == 4 * header["trainable_numel"]  # full copy, reported
    assert replay_main([str(out), "--verify"]) == 0  # schedule and proximal pulls replay bit for bit


@pytest.mark.parametrize(
    ("strategy", "extra"), [("static", ()), ("dynamic", ("--rank-bins", "3")), ("incremental", ("--prox", "1.0"))]
)
def test_dp_zopo_strategies_replay_bit_for_bit(assets, tmp_path, strategy, extra):
    out = tmp_path / strategy
    flags = ("--method", "dp-zopo", "--mask-strategy", strategy, "--keep-fraction", "0.05", "--prune-queries", "4")
    assert train_main(args(assets, out, *flags, *extra)) == 0
    rows = ledger(out)
    masks = [r["mask"] for r in rows if r["type"] == "stage"]
    n = rows[0]["trainable_numel"]
    assert [m["recomputed"] for m in masks] == [True, strategy != "static", strategy != "static"]
    grows = strategy == "incremental"
    assert [m["kept"] for m in masks] == [round(0.05 * n * (s + 1 if grows else 1)) for s in range(3)]
    assert all(m["bytes"] == max(1, m["rank_bins"]) * ((n + 7) // 8) for m in masks)  # bits per parameter
    if strategy == "static":
        assert len({m["sha256"] for m in masks}) == 1
    assert replay_main([str(out), "--verify"]) == 0


def test_dp_zopo_trains_only_the_masked_weights(assets, tmp_path):
    out = tmp_path / "static"
    flags = ("--method", "dp-zopo", "--keep-fraction", "0.02", "--prune-queries", "4")
    assert train_main(args(assets, out, *flags)) == 0
    from dpzo_engine.run.config import TrainConfig
    from dpzo_engine.run.session import build_model
    from dpzo_engine.zo.engine import ZOEngine
    from dpzo_engine.zo.stagewise import build_stagewise

    cfg = TrainConfig(**json.loads((out / "config.json").read_text()))
    built = build_model(cfg, 2)
    model, flat = built.model, built.flat
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    stages = build_stagewise(cfg.stage_options(), model, flat, ZOEngine(flat, backend="cpu"))
    stages.enter_stage(0)  # the static mask, recomputed from public values
    keep = ops.unpack_mask(stages.masks.mask.packed[0], flat.numel)
    trained = weights(out)
    moved = torch.zeros(flat.numel, dtype=torch.bool)
    for name, slot in flat.slots.items():
        diff = trained[name].reshape(-1) != initial[name].reshape(-1)
        moved[slot.start : slot.start + slot.numel] = diff
    assert not bool((moved & ~keep).any())  # nothing outside the mask moved, not even by a rounding
    assert int(moved.sum()) >= 0.95 * int(keep.sum())  # and the masked weights did train


def test_resume_at_a_stage_boundary_matches_uninterrupted(assets, tmp_path, monkeypatch):
    flags = ("--method", "dp-zopo", "--mask-strategy", "incremental", "--keep-fraction", "0.05", "--prune-queries", "2")
    common = ("--steps", "14", "--save-every", "2", "--noise-seed", "5", "--prox", "0.3", *flags)
    whole = tmp_path / "whole"
    with pytest.warns(UserWarning):
        assert train_main(args(assets, whole, *common)) == 0

    original = Session.save_checkpoint

    def save_then_stop(self, run, step):
        original(self, run, step)
        if step == 6:  # stage 2 starts at step index 6: the resume re-enters it
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    monkeypatch.setattr(Session, "save_checkpoint", save_then_stop)
    with pytest.warns(UserWarning):
        assert train_main(args(assets, cut, *common)) == 130
    monkeypatch.setattr(Session, "save_checkpoint", original)
    with pytest.warns(UserWarning):
        assert train_main(args(assets, cut, *common, "--resume")) == 0
    a, b = weights(whole), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "ledger.jsonl").read_text().splitlines()[1:] == (cut / "ledger.jsonl").read_text().splitlines()[1:]


def test_replay_refuses_a_tampered_mask_record(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(args(assets, out, "--method", "dp-zopo", "--prune-queries", "2")) == 0
    rows = read_jsonl(out / "ledger.jsonl")
    for r in rows:
        if r["type"] == "stage" and "mask" in r:
            r["mask"]["sha256"] = "0" * 64
    (out / "ledger.jsonl").write_text(journal.write_lines(rows))  # a consistent chain: replay's own check
    capsys.readouterr()
    assert replay_main([str(out)]) == 2
    assert "mask differs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- privacy
def test_masks_and_schedules_cost_no_epsilon(assets, tmp_path):
    """Same σ and the same ε spent for DP-AggZO, DP-ZOSO and DP-ZOPO: the mask and the schedule are
    data-free, and the accountant counts one Gaussian release per step whatever the clipping."""
    runs = {
        "aggzo": ("--method", "dp-aggzo"),
        "zoso": ("--method", "dp-zoso", "--stages", "2"),
        "zopo": ("--method", "dp-zopo", "--mask-strategy", "dynamic", "--prune-queries", "2"),
        "zopo-perdir": ("--method", "dp-zopo", "--clipping", "per-direction", "--prune-queries", "2"),
    }
    summaries = {}
    for name, extra in runs.items():
        assert train_main(args(assets, tmp_path / name, "-K", "4", *extra)) == 0
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert len({s["noise_multiplier"] for s in summaries.values()}) == 1
    assert len({s["epsilon_spent"] for s in summaries.values()}) == 1
    assert ledger(tmp_path / "zopo-perdir")[0]["clip_mode"] == "per_direction"


@pytest.mark.parametrize("method", ["dp-zoso", "dp-zopo"])
def test_per_direction_clipping_releases_noise_of_sensitivity_c_sqrt_k(assets, tmp_path, method):
    """Joint clipping: sensitivity C, noise σC per coordinate. Per-direction: C√K, noise σC√K (pitfall P5:
    the public DP-ZOPO code noises each direction at σC and under-counts). Empty batches release pure noise."""
    from dpzo_engine.run.config import parse_args
    from dpzo_engine.run.run_dir import RunDir

    K, C, draws = 4, 0.5, 3000
    stds = {}
    for clipping in ("joint", "per-direction"):
        out = tmp_path / clipping
        cfg = parse_args(args(assets, out, "--method", method, "-K", str(K), "--clip", str(C), "--clipping", clipping))
        session = Session(cfg, RunDir(out), resuming=False)
        mech = session.zo.rule.mechanism
        assert mech.sensitivity == pytest.approx(C if clipping == "joint" else C * math.sqrt(K))
        noise = torch.stack([session.zo.rule(torch.zeros(0, K)).grad for _ in range(draws)])
        stds[clipping] = float(noise.std()) * session.zo.rule.expected_batch_size
        assert stds[clipping] == pytest.approx(session.sigma * mech.sensitivity, rel=0.05)
    assert stds["per-direction"] / stds["joint"] == pytest.approx(math.sqrt(K), rel=0.07)


# ----------------------------------------------------------------------------- bad input
BAD = [
    (("--method", "dp-zopo", "--keep-fraction", "0"), "--keep-fraction"),
    (("--method", "dp-zopo", "--keep-fraction", "1.5"), "--keep-fraction"),
    (("--method", "dp-zopo", "--mask-strategy", "random"), "--mask-strategy"),
    (("--method", "dp-zopo", "--rank-bins", "99"), "--rank-bins"),
    (("--method", "dp-zopo", "--prune-queries", "0"), "--prune-queries"),
    (("--method", "dp-zoso", "--stages", "0"), "--stages"),
    (("--method", "dp-zoso", "--stages", "4"), "needs at least 15 steps"),
    (("--method", "dp-zoso", "--zo-scale-end", "0"), "--zo-scale-end"),
    (("--method", "dp-zoso", "--zo-scale-end=-1e-3"), "--zo-scale-end"),
    (("--method", "dp-zoso", "--zo-scale-start", "inf"), "--zo-scale-start"),
    (("--method", "dp-zoso", "--lr-decay", "2"), "--lr-decay"),
    (("--method", "dp-zoso", "--prox", "-1"), "--prox"),
    (("--method", "dp-zoso", "--keep-fraction", "0.1"), "dp-zopo only"),
    (("--method", "dp-aggzo", "--stages", "3"), "dp-zoso or dp-zopo only"),
    (("--method", "mezo", "--mask-strategy", "static"), "dp-zoso or dp-zopo only"),
    (("--method", "dp-aggzo-perdir", "--clipping", "joint"), "dp-aggzo-perdir"),
    (("--method", "mezo", "--clipping", "joint"), "--clipping"),
    (("--method", "dp-zoso", "--clipping", "both"), "--clipping"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD)
def test_bad_flags_fail_cleanly(assets, tmp_path, refused, extra, needle):
    out = tmp_path / "run"
    refused(args(assets, out, *extra), needle)
    assert not out.exists()
