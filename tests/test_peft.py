"""LoRA and prefix-tuning through PEFT (``dpzo_engine/models/adapters.py``) and the trainer's ``--peft``.

What must hold: the flat buffer is exactly the adapter (plus the modules saved beside it); what we
train is what PEFT reloads (``PeftModel.from_pretrained`` gives the same outputs bit for bit, and our
prefix-tuning forward equals PEFT's own); a merged adapter is a plain model with the same outputs;
replay and resume reproduce an adapter run bit for bit; the frozen-prefix cache is used exactly when
the adapter leaves the lower blocks alone; DP-AdamW clips LoRA gradients per example.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_fixtures import tiny_lm
from safetensors.torch import load_file
from test_first_order import NO_DROPOUT, per_example_gradients, released_gradient

from dpzo_engine.core import stream
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.heads import SequenceClassificationHead
from dpzo_engine.models.adapters import AdapterError, AdapterOptions, build_adapter
from dpzo_engine.models.loading import build_random_model, random_batch
from dpzo_engine.models.prefix_cache import cached_prefix
from dpzo_engine.models.step_forward import StepForward
from dpzo_engine.run.first_order import FirstOrderTrainer
from dpzo_engine.run.run_dir import check_model_sums
from dpzo_engine.run.session import Session
from dpzo_engine.train import main as train_main
from dpzo_engine.zo.engine import ZOEngine

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention

SEQ = "sequence-classification"


def lora(model, head: str = SEQ, **kw):
    torch.manual_seed(0)  # the adapter's initialisation (LoRA's A), as the session's public seed does
    return build_adapter(model, AdapterOptions(kind="lora", r=4, **kw), head)


def prefix(model, head: str = SEQ, **kw):
    torch.manual_seed(0)  # the virtual tokens' initialisation
    return build_adapter(model, AdapterOptions(kind="prefix", num_virtual_tokens=3, **kw), head)


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def train_a_little(flat: FlatParams, seed: int = 0) -> None:
    """Move every trainable weight (LoRA's B starts at zero, so an untrained adapter would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    for buf in flat.buffers:
        buf.add_(0.05 * torch.randn(buf.shape, generator=g, dtype=buf.dtype))


# ----------------------------------------------------------------------------- the flat buffer


def test_lora_flat_buffer_is_the_adapter_and_the_modules_saved_beside_it():
    a = lora(build_random_model("bert", "tiny", seed=0), trainable="head")  # hidden 32, 2 blocks
    flat = FlatParams(a.peft_model)
    lora_names = {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default.weight"
        for i in (0, 1)
        for m in ("query", "value")
        for ab in "AB"
    }
    saved = {
        f"base_model.model.{m}.modules_to_save.default.{p}" for m in ("bert.pooler.dense", "classifier")
        for p in ("weight", "bias")
    }  # fmt: skip
    assert set(flat.names()) == lora_names | saved == set(a.trainable_names())
    assert flat.numel == 2 * 2 * (4 * 32 + 32 * 4) + (32 * 32 + 32) + (32 * 2 + 2)
    frozen = [n for n, p in a.peft_model.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n or "modules_to_save" in n for n in frozen)
    # the parameters are views of the buffer: moving the buffer moves the model's function
    batch = random_batch(a.model, 3, 8, seed=1)
    with torch.no_grad():
        before = a.model(**inputs(batch)).logits
        train_a_little(flat)
        assert not torch.equal(before, a.model(**inputs(batch)).logits)
    assert a.describe()["modules_to_save"] == ["bert.pooler.dense", "classifier", "score"]


def test_prefix_flat_buffer_is_the_virtual_tokens_and_the_classifier():
    a = prefix(build_random_model("bert", "tiny", seed=0))  # --trainable none: SEQ_CLS keeps the classifier
    flat = FlatParams(a.peft_model)
    assert flat.names() == [
        "base_model.classifier.modules_to_save.default.weight",
        "base_model.classifier.modules_to_save.default.bias",
        "prompt_encoder.default.embedding.weight",
    ]
    assert flat.numel == (32 * 2 + 2) + 3 * (2 * 2 * 32)  # P × (blocks × {key, value} × hidden)


def test_trainable_spec_must_select_whole_modules():
    with pytest.raises(AdapterError, match="selects part of module"):
        lora(build_random_model("bert", "tiny", seed=0), trainable="bias")
    with pytest.raises(AdapterError, match=r"selects part of module lm_head \(lm_head.decoder.weight"):
        lora(tiny_lm("roberta", "mlm-prompt")[0], head="mlm-prompt", trainable="head")  # tied to the embeddings
    with pytest.raises(AdapterError, match="drop --peft"):
        lora(build_random_model("bert", "tiny", seed=0), trainable="all")
    tied = build_random_model("llama", "tiny", seed=0, head="causal-prompt", tie_word_embeddings=True)
    a = lora(tied, head="causal-prompt", trainable="head")  # a tied LM head has nothing of its own
    assert all("lora_" in n for n in a.trainable_names())
    with pytest.raises(AdapterError, match="PEFT cannot build"):
        lora(build_random_model("bert", "tiny", seed=0), target_modules=("no_such_module",))
    with pytest.raises(AdapterError, match="2 blocks"):
        lora(build_random_model("bert", "tiny", seed=0), layers="last:3")
    with pytest.raises(AdapterError, match="--lora-dropout must be 0"):
        build_adapter(build_random_model("bert", "tiny"), AdapterOptions(dropout=0.1), SEQ)


# ----------------------------------------------------------------------------- the frozen-prefix cache


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda m: lora(m), 0),  # LoRA on every block: nothing below it is frozen
        (lambda m: lora(m, layers="last:1"), 1),
        (lambda m: lora(m, layers="1"), 1),
        (lambda m: lora(m, layers="0"), 0),
        (lambda m: lora(m, target_modules=("word_embeddings",), layers="all"), 0),  # LoRA on the embeddings
        (lambda m: prefix(m), 0),  # virtual tokens enter every block
    ],
)
def test_cached_blocks_follow_the_adapter(make, expected):
    assert make(build_random_model("bert", "tiny", seed=0)).cached_blocks() == expected


@pytest.mark.parametrize("kind", ["lora-last", "prefix"])
def test_cached_estimates_equal_uncached_with_an_adapter(kind):
    """The session's cache length gives the uncached estimate bit for bit (prefix: no cache at all)."""
    head = SequenceClassificationHead()

    def run(cache: bool):
        model = build_random_model("opt", "tiny", seed=0)
        a = lora(model, layers="last:1") if kind == "lora-last" else prefix(model)
        flat = FlatParams(a.peft_model)
        train_a_little(flat)
        engine = ZOEngine(flat, backend="reference")
        batch = random_batch(a.model, 5, 10, seed=3)
        seeds = stream.step_seeds(7, 0, 3)
        with torch.no_grad(), cached_prefix(a.model, a.cached_blocks() if cache else 0):
            D = engine.estimate(lambda: head.per_example_loss(a.model, batch), seeds, 1e-2)
        return D

    D_cached, D_plain = run(True), run(False)
    assert torch.equal(D_cached, D_plain) and bool(D_plain.abs().sum() > 0)


@pytest.mark.parametrize("arch", ["roberta", "opt"])  # encoder: last block trimmed to [CLS]; decoder: left whole
@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_step_forwards_with_an_adapter_equal_the_plain_forward(arch, kind):
    """A step's forwards as the session runs them (the mask and positions built once where the adapter
    allows, the last block at the read positions) give the plain forward's losses: LoRA on every block,
    the last included, and prefix-tuning, whose hook needs the model's own 2-D mask."""
    model = build_random_model(arch, "tiny", seed=0)
    a = lora(model) if kind == "lora" else prefix(model)
    train_a_little(FlatParams(a.peft_model))
    head = SequenceClassificationHead()
    batch = random_batch(a.model, 4, 9, seed=2)

    def step_losses(static: bool) -> torch.Tensor:
        forward = StepForward(
            lambda b: head.per_example_loss(a.model, b), "cpu", "off",
            prepare=(lambda b: head.prepare(a.model, b)) if static else None,
            model=a.model, read_positions=lambda b: head.read_positions(a.model, b),
        )  # fmt: skip
        return forward.bind(batch)()

    with torch.no_grad():
        plain = head.per_example_loss(a.model, batch)
        assert a.static_inputs == (kind == "lora")
        ours = step_losses(a.static_inputs)
        if kind == "prefix":  # why prefix-tuning gets the model's own inputs: a prepared 4-D mask breaks its hook
            with pytest.raises(RuntimeError):
                step_losses(True)
    torch.testing.assert_close(ours, plain, rtol=2e-6, atol=1e-6)  # the trimmed block: fp32 rounding


def test_a_cache_that_ignored_the_prefix_would_be_wrong():
    """Why prefix-tuning gets no cache: block 0's output depends on the virtual tokens."""
    model = build_random_model("bert", "tiny", seed=0)
    a = prefix(model)
    flat = FlatParams(a.peft_model)
    head = SequenceClassificationHead()
    batch = random_batch(a.model, 4, 8, seed=2)
    virtual = a.peft_model.prompt_encoder["default"].embedding.weight
    assert flat.slots["prompt_encoder.default.embedding.weight"].numel == virtual.numel()
    with torch.no_grad(), cached_prefix(a.model, 2):  # what the head-only rule would cache
        first = head.per_example_loss(a.model, batch)
        virtual.add_(0.5)  # only the virtual tokens move
        stale = head.per_example_loss(a.model, batch)
    with torch.no_grad():
        fresh = head.per_example_loss(a.model, batch)
    assert torch.equal(first, stale) and not torch.equal(stale, fresh)


# ----------------------------------------------------------------------------- save, reload, merge


def _lm_logits(model, batch):
    """Logits through the path the prompt heads take: the backbone, then the LM head module."""
    hidden = model.base_model(**inputs(batch))[0]
    return (model.lm_head if hasattr(model, "lm_head") else model.cls)(hidden)


CASES = [
    ("bert", SEQ, "lora"),
    ("bert", SEQ, "prefix"),
    ("opt", SEQ, "prefix"),
    ("opt", "causal-prompt", "lora"),
    ("opt", "causal-prompt", "prefix"),  # OPT's causal LM calls its decoder directly
    ("llama", "causal-prompt", "prefix"),  # grouped key/value heads
    ("roberta", "mlm-prompt", "lora"),
    ("roberta", "mlm-prompt", "prefix"),
]


@pytest.mark.parametrize(("arch", "head", "kind"), CASES)
def test_saved_adapter_reloads_in_peft_with_the_same_outputs(tmp_path, arch, head, kind):
    """Our forward (heads call the transformers model; prefix through our hook) equals PEFT's own forward
    on the adapter reloaded by ``PeftModel.from_pretrained`` onto a fresh copy of the base model."""
    from peft import PeftModel

    def base():
        return tiny_lm(arch, head)[0] if head != SEQ else build_random_model(arch, "tiny", seed=0)

    model = base()
    a = (lora if kind == "lora" else prefix)(model, head=head)
    flat = FlatParams(a.peft_model)
    train_a_little(flat)
    batch = random_batch(a.model, 4, 9, min_length=3, seed=5)
    with torch.no_grad():
        ours = a.model(**inputs(batch)).logits
        ours_heads_path = None if head == SEQ else _lm_logits(a.model, batch)
    a.save(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == flat.numel  # the adapter, nothing of the base

    fresh = base()
    if head == SEQ:  # a fresh classifier is random: the adapter's copy must replace it
        torch.nn.init.normal_(fresh.get_submodule("score" if arch == "opt" else "classifier").weight)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        native = loaded(**inputs(batch)).logits
    assert torch.equal(ours, native)
    if ours_heads_path is not None:
        torch.testing.assert_close(ours_heads_path, native, rtol=0, atol=1e-6)  # same math, another kernel order


def test_merged_lora_is_a_plain_model_with_the_same_outputs(tmp_path):
    from transformers import AutoModelForSequenceClassification

    a = lora(build_random_model("bert", "tiny", seed=0))
    train_a_little(FlatParams(a.peft_model))
    batch = random_batch(a.model, 4, 9, seed=6)
    with torch.no_grad():
        ours = a.model(**inputs(batch)).logits
    merged = a.merged()
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs(batch)).logits, ours, rtol=0, atol=1e-5)  # W + BA·s rounded once
    with pytest.raises(AdapterError, match="cannot be merged"):
        prefix(build_random_model("bert", "tiny", seed=0)).merged()


# ----------------------------------------------------------------------------- DP-AdamW with LoRA


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_adamw_clips_lora_gradients_per_example(mode):
    model = build_random_model("bert", "tiny", seed=0, **NO_DROPOUT)
    a = lora(model, layers="last:1")
    head = SequenceClassificationHead()
    train_a_little(FlatParams(a.peft_model))  # B != 0: gradients reach A too
    a.model.train()
    batch = random_batch(a.model, 6, 7, min_length=3, seed=1)
    grads = per_example_gradients(a.model, head, batch)
    norms = torch.stack([torch.stack([g.norm() for g in gs]).norm() for gs in grads])
    clip = float(norms.median())
    expected = [
        sum(gs[j] * min(1.0, clip / (float(n) + 1e-6)) for gs, n in zip(grads, norms)) for j in range(len(grads[0]))
    ]
    trainer = FirstOrderTrainer(a.model, head, lr=1e-3, mode=mode)
    assert {id(p) for p in trainer.params} == {id(p) for p in a.peft_model.parameters() if p.requires_grad}
    trainer.make_private(noise_multiplier=0.0, clip=clip, expected_batch_size=4.0, generator=torch.Generator())
    try:
        got = released_gradient(trainer, batch)
    finally:
        trainer.close()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g * 4.0, e, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the trainer


def cli(assets, out: Path, *extra: str) -> list[str]:
    model_dir, data_dir = assets
    directions = [] if "dp-adamw" in extra else ["-K", "2"]  # a ZO flag: refused under a first-order method
    return [
        "--model", str(model_dir), "--task", "local", "--data-dir", str(data_dir), "--max-length", "16",
        "--batch-size", "8", "--steps", "6", *directions, "--lr", "0.05", "--log-every", "2", "--save-every", "2",
        "--eval-batch-size", "32", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def header(out: Path) -> dict:
    return json.loads((out / "ledger.jsonl").read_text().splitlines()[0])


def evaluated(assets, model: Path, capsys) -> dict:
    """``python -m dpzo_engine.evaluate --model MODEL`` on the run's data: its JSON line."""
    from dpzo_engine.evaluate import main as evaluate_main

    _, data_dir = assets
    capsys.readouterr()
    args = ["--model", str(model), "--task", "local", "--data-dir", str(data_dir), "--max-length", "16"]
    assert evaluate_main([*args, "--eval-batch-size", "32"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_lora_saves_the_adapter_that_peft_loads_replays_and_merges(assets, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from dpzo_engine.data import get_task
    from dpzo_engine.heads import evaluate
    from dpzo_engine.replay import main as replay_main

    out = tmp_path / "run"
    flags = ("--peft", "lora", "--lora-layers", "last:1", "--trainable", "head", "--merge-adapter")
    assert train_main(cli(assets, out, *flags)) == 0
    files = {f.name for f in (out / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    h, summary = header(out), json.loads((out / "summary.json").read_text())
    assert h["cached_blocks"] == 1 and h["adapter"]["layers"] == "last:1"
    assert h["trainable_numel"] == 2 * (8 * 32 + 32 * 8) + (32 * 32 + 32) + (32 * 2 + 2)  # LoRA q v, pooler, classifier
    assert summary["saved"]["weights_bytes"] < summary["saved"]["merged_weights_bytes"] / 10
    for d in (out / "model", out / "model-merged"):  # each written whole, with its checksums (run_dir.save_model)
        listed = {line.split("  ", 1)[1] for line in (d / "SHA256SUMS").read_text().splitlines()}
        assert listed == {f.name for f in d.iterdir()} - {"SHA256SUMS"}
        check_model_sums(d)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
    assert replay_main([str(out), "--verify"]) == 0

    # what a user does: the base model, then PEFT; and the merged plain model. Both score as reported.
    model_dir, data_dir = assets
    test = get_task("local", data_dir=str(data_dir), seed=0).test
    torch.manual_seed(123)  # the base's fresh classifier differs from the run's: the adapter replaces it
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(base, out / "model").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model-merged").eval()
    tok = loaded_tokenizer(out / "model")
    final = summary["final_test"]["accuracy"]
    for model in (loaded, merged):
        with torch.no_grad():
            assert evaluate(model, SequenceClassificationHead(), test, tok, 32, 16)["accuracy"] == final
    for saved in (out / "model", out / "model-merged"):  # evaluation only, on the adapter or the merged model
        result = evaluated(assets, saved, capsys)
        assert result["accuracy"] == final and result["loss"] == pytest.approx(summary["final_test"]["loss"])


def loaded_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_cli_prefix_replays_bit_for_bit_without_the_cache(assets, tmp_path, capsys):
    from dpzo_engine.replay import main as replay_main

    out = tmp_path / "run"
    assert train_main(cli(assets, out, "--peft", "prefix", "--num-virtual-tokens", "2")) == 0
    assert header(out)["cached_blocks"] == 0 and header(out)["adapter"]["num_virtual_tokens"] == 2
    assert replay_main([str(out), "--verify", "--out", str(tmp_path / "replayed")]) == 0
    a = load_file(out / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "replayed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = json.loads((out / "summary.json").read_text())["final_test"]
    result = evaluated(assets, out / "model", capsys)  # the virtual tokens are used: the run's scores
    assert result["accuracy"] == final["accuracy"] and result["loss"] == pytest.approx(final["loss"])


def test_cli_lora_resume_matches_uninterrupted(assets, tmp_path, monkeypatch):
    common = ("--peft", "lora", "--lora-r", "2", "--noise-seed", "9")
    whole = tmp_path / "whole"
    with pytest.warns(UserWarning):
        assert train_main(cli(assets, whole, *common)) == 0

    original = Session.save_checkpoint

    def save_then_stop(self, run, step):
        original(self, run, step)
        if step == 4:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    monkeypatch.setattr(Session, "save_checkpoint", save_then_stop)
    with pytest.warns(UserWarning):
        assert train_main(cli(assets, cut, *common)) == 130
    monkeypatch.setattr(Session, "save_checkpoint", original)
    with pytest.warns(UserWarning):
        assert train_main(cli(assets, cut, *common, "--resume")) == 0
    a = load_file(whole / "model" / "adapter_model.safetensors")
    b = load_file(cut / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "ledger.jsonl").read_text().splitlines()[1:] == (cut / "ledger.jsonl").read_text().splitlines()[1:]


def test_cli_lora_resume_and_replay_refuse_what_integrity_refuses(assets, tmp_path, monkeypatch, capsys):
    """An adapter run goes through the run directory's checks: another adapter is another config, and a
    damaged adapter file is named (not reported as a differing tensor)."""
    from dpzo_engine.replay import main as replay_main

    out = tmp_path / "run"
    original = Session.save_checkpoint

    def save_then_stop(self, run, step):
        original(self, run, step)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(Session, "save_checkpoint", save_then_stop)
    assert train_main(cli(assets, out, "--peft", "lora", "--lora-r", "2")) == 130
    monkeypatch.setattr(Session, "save_checkpoint", original)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert train_main(cli(assets, out, "--peft", "lora", "--lora-r", "4", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different config" in err[0] and "lora_r" in err[0], err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before

    assert train_main(cli(assets, out, "--peft", "lora", "--lora-r", "2", "--resume")) == 0
    assert replay_main([str(out), "--verify"]) == 0
    weights = out / "model" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert replay_main([str(out), "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter_model.safetensors is damaged" in err[0], err


def test_cli_dp_adamw_with_lora(assets, tmp_path):
    out = tmp_path / "dp"
    extra = ("--method", "dp-adamw", "--lr", "1e-3", "--peft", "lora", "--lora-dropout", "0.1", "--steps", "3")
    assert train_main(cli(assets, out, *extra)) == 0  # dropout is fine for backprop: one forward per step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["first_order"]["opacus_mode"] == "ghost" and 0 < summary["epsilon_spent"] <= 2.0
    assert summary["first_order"]["trainable_numel"] == header(out)["trainable_numel"]
    assert (out / "model" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--peft", "lora", "--lora-dropout", "0.1"], "--lora-dropout must be 0"),
        (["--peft", "prefix", "--merge-adapter"], "--merge-adapter applies to --peft lora"),
        (["--merge-adapter"], "--merge-adapter applies to --peft lora"),
        (["--peft", "prefix", "--lora-r", "4"], "--lora-r applies to --peft lora"),
        (["--peft", "lora", "--num-virtual-tokens", "4"], "--num-virtual-tokens applies to --peft prefix"),
        (["--peft", "ia3"], "--peft must be one of"),
        (["--peft", "lora", "--lora-r", "0"], "--lora-r"),
        (["--peft", "lora", "--lora-layers", "top"], "--lora-layers"),
        (["--peft", "lora", "--trainable", "bias"], "selects part of module"),
        (["--peft", "lora", "--trainable", "all"], "drop --peft"),
        (["--peft", "lora", "--target-modules", "nothing_here"], "PEFT cannot build"),
        (["--peft", "prefix", "--method", "dp-adamw"], "--peft prefix is not supported"),
        (["--peft", "lora", "--method", "dp-zoso"], "not supported with --method dp-zoso"),
    ],
)
def test_cli_peft_bad_input(assets, tmp_path, refused, extra, needle):
    out = tmp_path / "run"
    refused(cli(assets, out, *extra), needle)
    assert not (out / "config.json").exists()
