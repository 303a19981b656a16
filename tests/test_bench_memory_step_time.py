"""Smoke tests: bench/memory_vs_dpadam.py and bench/step_time.py run end to end in their tiniest modes.

They check the code paths and the outputs' shape, not performance (targets are GPU ratios).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """Import a benchmark script as a module (they import their sibling ``common``)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_opt_350m_is_facebook_opt_350m():
    """models.SIZES["opt"]["350m"]: 512-wide embeddings with project_in/out, post-LayerNorm blocks."""
    from dpzo_engine.models.loading import build_random_model

    model = build_random_model("opt", "350m", device="meta", head="causal-generation")
    decoder = model.model.decoder
    assert sum(p.numel() for p in model.parameters()) == 331_196_416  # its checkpoint: 662,392,832 fp16 bytes
    assert decoder.project_in.in_features == 512 and decoder.final_layer_norm is None
    assert not model.config.do_layer_norm_before


def test_memory_benchmark_quick_inline(tmp_path):
    bench = load("memory_vs_dpadam")
    out = tmp_path / "memory.json"
    report = bench.main(["--quick", "--inline", "--device", "cpu", "--out", str(out)])
    rows = report["results"]
    methods = bench.method_names(bench.SMALL_DIRECTIONS)
    assert {(r["setting"], r["method"]) for r in rows} == {(s, m) for s in ("sst2", "squad") for m in methods}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert report["targets"] == [] and "need a GPU" in report["measure"]
    assert json.loads(out.read_text())["results"] == rows
    assert out.with_suffix(".png").stat().st_size > 0 and "| opt-tiny | sst2 |" in out.with_suffix(".md").read_text()
    cell = {(r["setting"], r["method"]): r for r in rows}
    assert cell[("sst2", "dp-adamw")]["first_order"]["opacus_mode"] == "ghost"
    assert cell[("squad", "dp-adamw")]["first_order"]["opacus_mode"] == "fast"  # tied LM head
    zopo = cell[("sst2", "dp-zopo")]
    assert zopo["mask_bytes"] == zopo["mask_extra_bytes"] > 0 and 0 < zopo["mask_kept_fraction"] < 0.02
    assert cell[("sst2", "dp-aggzo-k4")]["directions"] == 4


def test_memory_benchmark_process_per_cell_and_oom_as_a_result(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the worker process
    bench = load("memory_vs_dpadam")
    one_cell = ["--quick", "--device", "cpu", "--methods", "inference", "--settings", "sst2"]
    report = bench.main([*one_cell, "--out", str(tmp_path / "m.json")])
    (row,) = report["results"]
    assert row["status"] == "ok" and row["cpu_max_rss_bytes"] > 0  # measured in a fresh worker process
    too_big = ["--batch-size", "1000000", "--seq-len", "1000000", "--inline"]  # 8e12 bytes of token ids
    huge = bench.main([*one_cell, *too_big, "--out", str(tmp_path / "oom.json")])
    assert huge["results"][0]["status"] == "oom"


def test_step_time_quick(tmp_path):
    bench = load("step_time")
    report = bench.main(["--quick", "--device", "cpu", "--profile", "--out", str(tmp_path / "st.json")])
    (model,) = report["results"]
    profile = model["profile"]["ours-eager"]  # the profiler counts the forward's matrix products
    assert profile["matrix_products_gflop"] > 0 and profile["matrix_products_gflop_per_s"] > 0
    assert model["sgemm_2048_gflop_per_s"] > 0
    assert model["loss_max_abs_difference"] < 1e-4  # ours, the published and the plain forward agree
    rows = {r["implementation"]: r for r in model["rows"]}
    assert set(rows) == set(bench.IMPLEMENTATIONS)
    k = rows["ours-central"]["K"]
    assert rows["ours-central"]["forwards_per_step"] == 2 * k == rows["mezo-style"]["forwards_per_step"]
    assert rows["ours-forward"]["forwards_per_step"] == k + 1
    assert rows["ours-central-rademacher"]["forwards_per_step"] == 2 * k  # the same step, ±1 directions
    assert all(r["step_s"] > 0 and 0 <= r["outside_forward_share"] < 1 for r in rows.values())
    assert rows["mezo-style"]["speedup_vs_mezo_style"] == 1.0
    assert [t["pass"] for t in report["targets"]] == [None] * 7  # GPU targets not judged on CPU, CPU ones not quick
    cached = rows["ours-central-cached"]  # the same step with the direction cache: half the generated values
    assert cached["forwards_per_step"] == 2 * k and cached["direction_cache_mb"] > 0
    assert (
        cached["direction_values_per_weight"] == 2 * k - 1
        and rows["ours-central"]["direction_values_per_weight"] == 4 * k - 1
    )
    (floor,) = model["generation_floor"]  # the default's generation alone, against the targets' budget
    weights = model["parameters"]
    assert floor["K"] == k and floor["central_values_per_weight"] == 4 * k - 1
    assert floor["central_generation_s"] == pytest.approx(floor["ns_per_value"] * 1e-9 * weights * (4 * k - 1))
    assert floor["outside_budget_both_targets_s"] == pytest.approx(rows["mezo-style"]["step_s"] / 8)
    assert floor["generation_within_both_targets_budget"] == (
        floor["central_generation_s"] <= floor["outside_budget_both_targets_s"]
    )
    forwards = report["results"][0]["forwards"]
    assert set(forwards) == {"plain", "published", "ours-whole-block", "ours-eager"}  # quick: no compilation
    assert all(f["forwards_per_s"] > 0 for f in forwards.values())
    assert json.loads((tmp_path / "st.json").read_text())["results"] == report["results"]


def test_kernel_benchmark_cpu_quick(tmp_path):
    """bench/kernels.py on the CPU: the two targets are computed from measured times (not judged here)."""
    bench = load("kernels")
    real = bench.minilm_layer_shapes(1)
    assert len(real) == 16 and sum(torch.Size(s).numel() for s in real) == 1_774_464  # one MiniLM-L6 layer
    bench.minilm_layer_shapes = lambda layers: real[:2]  # 384 x 384 + 384: seconds, not minutes, for the J=65 loop
    out = tmp_path / "kernels.json"
    report = bench.main(["--quick", "--device", "cpu", "--sizes", "20000", "--out", str(out)])
    assert json.loads(out.read_text())["targets"] == report["targets"]
    names = [t["name"] for t in report["targets"]]
    assert names[0].startswith("Gaussian values/s vs torch.normal") and "J=65" in names[1]
    assert all(t["measured"] > 0 and t["pass"] in (True, False) for t in report["targets"])
    results = report["results"]
    assert "ours (scalar)" in results["gaussian_values"]["ratio_by_isa"]
    assert [r["J"] for r in results["apply_vs_mezo"]] == bench.CPU_DIRECTIONS_QUICK
    assert results["mezo_shapes"] == "all-MiniLM-L6-v2 encoder, 1 layer(s) (2 tensors)"
    assert results["load_average_1min"]["before"] is not None
    passes = results["step_passes"]  # a central step's passes, with and without the direction cache
    assert set(passes["pass_ms"]) == {f"{p}{c}" for p in ("enter", "flip", "leave and enter") for c in ("", ", cached")}
    assert all(ms > 0 for ms in passes["pass_ms"].values()) and passes["threads"] == 1
