"""bench/utility.py on tiny models: the replayed frozen features give exactly the full model's
losses (encoder + classifier, causal LM + verbalizer), a run counts its forwards, the claim check
compares the margin with the seed spread, and the plot is written."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from lm_fixtures import sentiment_examples, tiny_lm

from dpzo_engine.data import Example, TaskData
from dpzo_engine.data.prompts import SENTIMENT2

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention

BENCH = Path(__file__).resolve().parents[1] / "bench" / "utility.py"


@pytest.fixture(scope="module")
def utility():
    spec = importlib.util.spec_from_file_location("bench_utility", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(BENCH.parent))  # its sibling bench/common.py, as when run as a script
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    yield module
    del sys.modules[spec.name]


def small_task() -> TaskData:
    base = sentiment_examples()
    ex = [Example(f"{e.text} {i}", e.label) for i in range(6) for e in base]
    return TaskData("tiny", ("negative", "positive"), ex[:16], ex[16:20], ex[20:], prompt=SENTIMENT2)


@pytest.mark.parametrize(
    ("arch", "head", "trainable"),
    [("roberta", "sequence-classification", "head"), ("llama", "causal-prompt", r"re:^model\.norm\.")],
)
def test_replayed_features_are_exact_and_runs_count_forwards(utility, tmp_path, arch, head, trainable):
    model, tok = tiny_lm(arch, head)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    s = utility.load_setting(small_task(), str(tmp_path), trainable, max_length=24)
    assert s.info["head"] == head and s.features.length == 2  # both tiny blocks replayed
    assert utility.check_replay_is_exact(s, n=8) < 1e-6
    with torch.no_grad():  # the test split too, through the evaluation path
        batch = s.head.collate(s.task.test, s.tokenizer, 24)
        full = s.head.per_example_loss(s.model, batch).double().mean().item()
    assert math.isclose(utility.scores(s, "test")["loss"], full, rel_tol=1e-6)
    grid = utility.Grid((0.01,), (4.0,))
    row = utility.run_method(s, utility.Method("dp-aggzo", 4), 2.0, grid, seeds=2, steps=3, batch_size=4, log=print)
    assert row["forwards_per_run"] <= 2 * 4 * 3 and len(row["seeds"]) == 2 and row["chosen"]["clip"] == 2.0
    assert row["epsilon_spent"] <= 2.0 + 1e-6 and row["test_accuracy"]["n"] == 2


def test_claim_and_plot(utility, tmp_path):
    def row(K, eps, accs, private=True):
        return {"K": K, "epsilon": eps, "private": private, "label": f"K={K}", "test_accuracy": utility.summarize(accs)}

    rows = [row(1, 2.0, [0.60, 0.62, 0.61]), row(16, 2.0, [0.70, 0.71, 0.69]), row(64, 2.0, [0.62, 0.63, 0.70])]
    rows.append(row(1, None, [0.6, 0.6], private=False))
    verdicts = {c["K"]: c for c in utility.claim(rows, [2.0])}
    assert verdicts[16]["holds"] and verdicts[16]["seed_spread"] == pytest.approx(0.02)
    assert not verdicts[64]["holds"]  # margin 0.04 < spread 0.08
    results = {
        "config": {"epsilons": [2.0], "steps": 3, "batch_size": 4, "model": "tiny"},
        "tasks": [{"task": "tiny", "methods": rows, "untrained": {"test": {"accuracy": 0.5}}}],
    }
    utility.plot(results, tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 1000


def test_peft_rows_dp_aggzo_and_dp_adamw_on_a_lora_adapter(utility, tmp_path):
    """The PEFT comparison on a tiny BERT: LoRA on the top block (the block below replayed, exactly),
    DP-AggZO and DP-AdamW (Opacus) rows with their costs, the LoRA-vs-DP-AdamW check, and the plot."""
    from dpzo_engine.models.adapters import AdapterOptions

    model, tok = tiny_lm("bert", "sequence-classification")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    adapter = AdapterOptions(kind="lora", r=2, layers="last:1")
    s = utility.load_setting(small_task(), str(tmp_path / "m"), "head", max_length=24, adapter=adapter)
    assert s.features.length == 1 and s.info["adapter"]["cached_blocks"] == 1
    assert s.info["top_block_first_position_only"]  # the LoRA block computed at [CLS] only: still exact
    assert utility.check_replay_is_exact(s, n=8) < 1e-6
    assert s.info["saved_weights_bytes"] < 4 * s.flat.numel + 4096  # the adapter alone, not the model
    grid = utility.Grid((0.01,), (4.0,))
    zo = utility.run_method(s, utility.Method("dp-aggzo", 4, setting="lora"), 2.0, grid, 2, 3, 4, print)
    fo_method = utility.Method("dp-adamw", 0, setting="lora")
    fo = utility.run_method(s, fo_method, 2.0, grid, 2, 3, 4, print, points=[(1e-3, 1.0), (3e-3, 1.0)])
    assert zo["label"] == "DP-AggZO (K=4) + LoRA" and fo["label"] == "DP-AdamW (Opacus) + LoRA"
    assert fo["opacus_mode"] == "ghost" and fo["epsilon_spent"] <= 2.0 + 1e-6 and len(fo["grid"]) == 2
    assert zo["extra_training_bytes"]["total"] < fo["extra_training_bytes"]["total"]
    assert fo["extra_training_bytes"]["optimizer_state"] == 2 * fo["extra_training_bytes"]["gradients"]
    (check,) = utility.peft_claim([zo, fo], [2.0])
    assert check["K"] == 4 and check["train_seconds_ratio"] > 0
    results = {
        "config": {"epsilons": [2.0], "steps": 3, "batch_size": 4, "model": "tiny", "threads": 1, "peft_ks": [4]},
        "tasks": [{"task": "tiny", "methods": [zo, fo], "untrained": {"test": {"accuracy": 0.5}}}],
    }
    utility.plot(results, tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 1000
    results["tasks"][0]["peft_claim"] = [check]
    md = utility.peft_markdown(results).splitlines()
    assert md[2] == "| tiny | untrained | – | 0.500 | – | – | – | – | – |"
    zo_line = next(line for line in md if line.startswith("| | DP-AggZO (K=4) + LoRA | 2 |"))
    assert f"{zo['test_accuracy']['mean']:.3f} ± " in zo_line and f"{zo['train_seconds']['mean']:.1f} s" in zo_line
    assert md[-1].startswith("- tiny, ε = 2: DP-AdamW + LoRA minus DP-AggZO (K = 4) + LoRA = ")
