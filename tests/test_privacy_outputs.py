"""What a run says about its privacy: private n done right, debug runs marked, footguns noted,
and the guarantee written next to the model (model card, privacy.json, label names)."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from transformers import BertConfig

from dpzo_engine.data import TaskData
from dpzo_engine.data.prompts import SENTIMENT2, SQUAD
from dpzo_engine.heads import CausalGenerationHead, CausalPromptHead, MaskedLMPromptHead, SequenceClassificationHead
from dpzo_engine.privacy import PrivacyPlan, SecretGenerator
from dpzo_engine.run.model_card import label_model_config
from dpzo_engine.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


def args(assets, out: Path, *extra: str) -> list[str]:
    model_dir, data_dir = assets
    return [
        "--model", str(model_dir), "--task", "local", "--data-dir", str(data_dir), "--trainable", "head",
        "--max-length", "16", "--steps", "3", "--num-directions", "4", "--log-every", "1",
        "--eval-batch-size", "32", "--max-eval-examples", "8", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def header(out: Path) -> dict:
    return json.loads((out / "ledger.jsonl").read_text().splitlines()[0])


# --------------------------------------------------------------------------- private n
def test_the_issue_reproduction_header_no_longer_reveals_n(assets, tmp_path):
    """``--count-share 0.3 --epsilon 1 --k-shot 16 --batch-size 8 -K 4 --steps 2``: the header used to
    say sample_rate 0.25, i.e. n = 8 / 0.25 = 32. Now q = 8 / ñ, from the released count."""
    out = tmp_path / "run"
    extra = ("--count-share", "0.3", "--epsilon", "1", "--k-shot", "16", "--batch-size", "8", "--steps", "2")
    assert train_main(args(assets, out, *extra)) == 0
    h = header(out)
    assert h["sample_rate_source"] == "batch_size / released_count"
    assert h["sample_rate"] == 8 / h["released_count"] and h["expected_batch_size"] == pytest.approx(8.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sample_rate"] == h["sample_rate"] and summary["sample_rate_source"] == h["sample_rate_source"]
    record = json.loads((out / "model" / "privacy.json").read_text())
    assert record["dataset_size"] is None and not record["dataset_size_public"]
    assert record["released_count"] == h["released_count"] and record["count_epsilon"] == pytest.approx(0.3)


def test_nothing_public_depends_on_the_true_n(monkeypatch):
    """Two datasets of different sizes that release the same noisy count give identical public facts."""
    monkeypatch.setattr("dpzo_engine.privacy.plan.laplace_count", lambda n, eps, g: 120)
    facts = []
    for n in (100, 137):
        for rate in ({"batch_size": 16}, {"sample_rate": 0.1}):
            plan = PrivacyPlan.create(
                n, steps=50, epsilon=2.0, delta=1e-5, count_share=0.05, generator=SecretGenerator(bytes(32)), **rate
            )
            facts.append((n, rate, plan.public_facts(), plan.normalizer))
    for rate in ({"batch_size": 16}, {"sample_rate": 0.1}):
        same_rate = [(f, norm) for n, r, f, norm in facts if r == rate]
        assert same_rate[0] == same_rate[1]
    by_batch = facts[0][2]
    assert by_batch["sample_rate"] == 16 / 120 and by_batch["sample_rate_source"] == "batch_size / released_count"
    assert facts[1][2]["sample_rate_source"] == "given"


def test_public_n_says_so():
    key = SecretGenerator(bytes(32))
    plan = PrivacyPlan.create(64, steps=10, batch_size=16, epsilon=2.0, delta=1e-5, generator=key)
    assert plan.sample_rate == 0.25 and plan.sample_rate_source == "batch_size / n" and plan.released_count is None


# --------------------------------------------------------------------------- footgun notes
def make_plan(n=1000, **kw) -> PrivacyPlan:
    base = {"steps": 20, "batch_size": 50, "epsilon": 2.0, "delta": 1e-5, "generator": SecretGenerator(bytes(32))}
    return PrivacyPlan.create(n, **{**base, **kw})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"batch_size": 600}, "q = 0.6 is 0.5 or more"),
        ({"n": 128, "batch_size": 128}, "q = 1 is 0.5 or more"),  # the README's old SmolLM2 example
        ({"delta": 0.01}, "delta = 0.01 is 1/n or more"),
        ({"epsilon": 50.0}, "rules out little"),
        ({"batch_size": None, "sample_rate": 1e-4}, "below one example"),
    ],
)
def test_footguns_get_a_note(kwargs, needle):
    assert any(needle in note for note in make_plan(**kwargs).notes), make_plan(**kwargs).notes


def test_a_sound_setting_gets_no_note():
    assert make_plan().notes == []


def test_notes_reach_stderr_as_note_lines(assets, tmp_path, capsys):
    assert train_main(args(assets, tmp_path / "run", "--batch-size", "96")) == 0  # q = 1 on 96 examples
    err = capsys.readouterr().err
    assert "note: the sampling rate q = 1 is 0.5 or more" in err


# --------------------------------------------------------------------------- debug runs and secrets
def test_a_noise_seed_run_says_not_private_everywhere(assets, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="NOT differentially private"):
        assert train_main(args(assets, out, "--batch-size", "16", "--noise-seed", "5")) == 0
    assert "NOT private" in capsys.readouterr().out
    h = header(out)
    assert h["private"] is False and h["privacy"].startswith("not private: debug --noise-seed")
    rows = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()[1:]]
    assert all(r["epsilon"] is None for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["private"] is False and summary["epsilon_spent"] is None and summary["epsilon_target"] is None
    record = json.loads((out / "model" / "privacy.json").read_text())
    assert record["private"] is False and record["epsilon"] is None and record["covered"] == []
    card = (out / "model" / "README.md").read_text()
    assert "**Not private**" in card and "epsilon, delta" not in card
    assert not (out / "secret.key").exists()  # a debug key is the seed's hash: nothing secret to keep


def test_a_private_run_keeps_its_key_in_a_600_file_and_nowhere_else(assets, tmp_path):
    out = tmp_path / "run"
    assert train_main(args(assets, out, "--batch-size", "16", "--save-every", "1")) == 0
    key_file = out / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = SecretGenerator.load(key_file).key
    for path in out.rglob("*"):
        if path.is_file() and path != key_file:
            data = path.read_bytes()
            assert key not in data and key.hex().encode() not in data, path


# --------------------------------------------------------------------------- the guarantee travels with the model
def test_model_card_and_privacy_json(assets, tmp_path):
    out = tmp_path / "run"
    assert train_main(args(assets, out, "--batch-size", "16", "--epsilon", "3")) == 0
    model = out / "model"
    record = json.loads((model / "privacy.json").read_text())
    for key in (
        "method", "unit_of_privacy", "epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps",
        "num_directions", "clip", "covered", "not_covered", "ledger_sha256", "dataset_size", "noise",
    ):  # fmt: skip
        assert key in record, key
    assert record["private"] and record["method"] == "dp-aggzo" and "one training example" in record["unit_of_privacy"]
    summary = json.loads((out / "summary.json").read_text())
    assert record["epsilon"] == summary["epsilon_spent"] <= 3.0 and record["delta"] == 1e-5
    assert record["accountant"]["epsilon_lower"] <= record["epsilon"] == record["accountant"]["epsilon_upper"]
    assert (record["steps"], record["num_directions"], record["clip"]) == (3, 4, 1.0)
    assert record["dataset_size"] == 96 and record["sample_rate"] == 16 / 96
    assert record["ledger_sha256"] == hashlib.sha256((out / "ledger.jsonl").read_bytes()).hexdigest()
    assert any("hyperparameter search" in x for x in record["not_covered"])
    assert any("evaluation data" in x for x in record["not_covered"])
    assert any("dataset size n" in x for x in record["not_covered"])
    card = (model / "README.md").read_text()
    assert card.startswith("---\n") and "differential-privacy" in card.split("---")[1]
    assert f"{record['epsilon']:.4g}" in card and record["ledger_sha256"] in card
    config = json.loads((model / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}


def test_prompt_heads_record_their_template_and_label_words(tmp_path):
    task = TaskData("sst-2", ("negative", "positive"), [], [], [], prompt=SENTIMENT2)
    for head, template in (
        (MaskedLMPromptHead(SENTIMENT2), "{text} It was {mask}."),
        (CausalPromptHead(SENTIMENT2), "{text} It was {mask}"),
    ):
        config = BertConfig()
        label_model_config(config, task, head)
        config.save_pretrained(tmp_path / head.name)
        saved = json.loads((tmp_path / head.name / "config.json").read_text())
        assert saved["dpzo_prompt"] == {"head": head.name, "template": template, "label_words": ["terrible", "great"]}
        assert saved["id2label"] == {"0": "negative", "1": "positive"}
    config = BertConfig()
    label_model_config(config, task, SequenceClassificationHead())
    assert not hasattr(config, "dpzo_prompt")
    squad = TaskData("squad", ("answer",), [], [], [], prompt=SQUAD)
    config = BertConfig()
    label_model_config(config, squad, CausalGenerationHead(SQUAD))
    assert config.dpzo_prompt == {"head": "causal-generation", "template": SQUAD.template}
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1"}  # generation: no classes to name
