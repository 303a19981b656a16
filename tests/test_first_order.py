"""DP-AdamW and AdamW (dpzo_engine/first_order.py) and their trainer path.

The core check: Opacus' clipped gradient sum, in every mode and with physical batches, equals a
per-example loop (one backward per example, clip, sum) on tiny random models of the benchmark
architectures, including a causal LM whose LM head is tied to its embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpzo_engine import privacy
from dpzo_engine.heads import SequenceClassificationHead
from dpzo_engine.models.loading import build_random_model, random_batch, random_config
from dpzo_engine.run.first_order import (
    HALF_PRECISION_CLIP_MARGIN,
    FirstOrderTrainer,
    MasterWeightAdamW,
    OpacusModeError,
    choose_opacus_mode,
    tied_parameters,
)
from dpzo_engine.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention

NO_DROPOUT = dict(
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)


class AnswerNLL:
    """Per-example mean next-token NLL through the LM head *module* (so Opacus sees it)."""

    def per_example_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        mask = batch["attention_mask"][:, 1:].float()
        return (nll * mask).sum(1) / mask.sum(1)


class FunctionalLabelWords:
    """Applies the tied LM head functionally on two vocabulary rows: Opacus cannot see that use."""

    def per_example_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        weight = model.get_output_embeddings().weight.index_select(0, torch.tensor([5, 6]))
        return F.cross_entropy(F.linear(hidden[:, -1], weight), batch["labels"], reduction="none")


def causal_lm(**overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(random_config("opt", "tiny", **NO_DROPOUT, **overrides))


MODELS = {
    "opt": (lambda: build_random_model("opt", "tiny", seed=0, **NO_DROPOUT), SequenceClassificationHead),
    "opt-350m-layout": (  # project_in/out and post-LayerNorm blocks, as OPT-350m
        lambda: build_random_model(
            "opt", "tiny", seed=0, word_embed_proj_dim=16, do_layer_norm_before=False, **NO_DROPOUT
        ),
        SequenceClassificationHead,
    ),
    "roberta": (lambda: build_random_model("roberta", "tiny", seed=0, **NO_DROPOUT), SequenceClassificationHead),
    "bert": (lambda: build_random_model("bert", "tiny", seed=0, **NO_DROPOUT), SequenceClassificationHead),
    "opt-causal-lm-tied": (causal_lm, AnswerNLL),
}


def per_example_gradients(model: nn.Module, head, batch: dict) -> list[list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(batch["labels"])):
        model.zero_grad(set_to_none=True)
        head.per_example_loss(model, {k: v[i : i + 1] for k, v in batch.items()}).sum().backward()
        out.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
    model.zero_grad(set_to_none=True)
    return out


def released_gradient(trainer: FirstOrderTrainer, batch: dict | None) -> list[torch.Tensor]:
    """p.grad as AdamW receives it (after clip, noise and the 1/(q n) scale), weights left as they were."""
    seen: dict[str, list[torch.Tensor]] = {}
    trainer._dp.attach_step_hook(lambda opt: seen.__setitem__("g", [p.grad.clone() for p in trainer.params]))
    before = [p.detach().clone() for p in trainer.params]
    trainer.step(batch)
    with torch.no_grad():
        for p, b in zip(trainer.params, before):
            p.copy_(b)
    return seen["g"]


@pytest.mark.parametrize(
    ("arch", "mode", "physical"),
    [
        ("opt", "auto", None),
        ("opt", "fast", 2),
        ("opt", "hooks", None),
        ("opt-350m-layout", "ghost", None),
        ("roberta", "ghost", 3),
        ("roberta", "hooks", 2),
        ("bert", "auto", None),
        ("opt-causal-lm-tied", "auto", None),
        ("opt-causal-lm-tied", "hooks", 2),
    ],
)
def test_clipped_sum_matches_a_per_example_loop(arch, mode, physical):
    make, head_cls = MODELS[arch]
    model, head = make(), head_cls()
    model.train()
    batch = random_batch(model, 6, 7, min_length=3, seed=1)
    grads = per_example_gradients(model, head, batch)
    norms = torch.stack([torch.stack([g.norm() for g in gs]).norm() for gs in grads])
    clip = float(norms.median())  # about half the examples are clipped
    expected = [
        sum(gs[j] * min(1.0, clip / (float(n) + 1e-6)) for gs, n in zip(grads, norms)) for j in range(len(grads[0]))
    ]

    trainer = FirstOrderTrainer(model, head, lr=1e-3, mode=mode, physical_batch_size=physical)
    q_n = 4.0
    trainer.make_private(noise_multiplier=0.0, clip=clip, expected_batch_size=q_n, generator=torch.Generator())
    try:
        got = released_gradient(trainer, batch)
        stats_mode = trainer.mode
    finally:
        trainer.close()
    if arch == "opt-causal-lm-tied":
        assert stats_mode == ("fast" if mode == "auto" else mode)
    elif mode == "auto":
        assert stats_mode == "ghost"
    for g, e in zip(got, expected):
        torch.testing.assert_close(g * q_n, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("arch", "head_name"), [("roberta", "mlm-prompt"), ("opt", "causal-prompt")])
@pytest.mark.parametrize("trainable", ["all", "last:1"])
def test_prompt_heads_are_clipped_per_example(arch, head_name, trainable):
    """The papers' prompt heads under DP-AdamW: with the (tied) vocabulary projection trainable its
    gradient goes through the decoder module, so the clipped sum still matches a per-example loop."""
    from lm_fixtures import sentiment_examples, tiny_lm

    from dpzo_engine.data.prompts import SENTIMENT2
    from dpzo_engine.heads import CausalPromptHead, MaskedLMPromptHead
    from dpzo_engine.models.loading import select_trainable

    model, tok = tiny_lm(arch, head_name, **NO_DROPOUT)
    select_trainable(model, trainable)
    head = (MaskedLMPromptHead if head_name == "mlm-prompt" else CausalPromptHead)(SENTIMENT2)
    batch = head.collate(sentiment_examples()[:5], tok, 32)
    model.train()
    grads = per_example_gradients(model, head, batch)
    norms = torch.stack([torch.stack([g.norm() for g in gs]).norm() for gs in grads])
    clip = float(norms.median())
    expected = [
        sum(gs[j] * min(1.0, clip / (float(n) + 1e-6)) for gs, n in zip(grads, norms)) for j in range(len(grads[0]))
    ]
    names = [n for n, _ in model.named_parameters()]
    trainer = FirstOrderTrainer(model, head, lr=1e-3)
    trainer.make_private(noise_multiplier=0.0, clip=clip, expected_batch_size=4.0, generator=torch.Generator())
    try:
        got = released_gradient(trainer, batch)
    finally:
        trainer.close()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g * 4.0, e, rtol=1e-4, atol=1e-6)
    assert [n for n, _ in model.named_parameters()] == names  # RoBERTa's lm_head.bias alias is registered again


def test_multi_token_label_words_are_refused():
    from lm_fixtures import sentiment_examples, tiny_lm

    from dpzo_engine.data import Prompt
    from dpzo_engine.heads import CausalPromptHead

    model, tok = tiny_lm("opt", "causal-prompt", **NO_DROPOUT)
    head = CausalPromptHead(Prompt("{text} It was {mask}.", ("terrible", "great fun")))
    batch = head.collate(sentiment_examples()[:3], tok, 32)
    assert head.expands_rows
    trainer = FirstOrderTrainer(model, head, lr=1e-3)
    trainer.make_private(noise_multiplier=1.0, clip=1.0, expected_batch_size=2.0, generator=torch.Generator())
    with pytest.raises(OpacusModeError, match="several tokens"):
        trainer.step(batch)
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_noise_comes_from_the_given_generator_with_std_sigma_c_over_qn():
    model = build_random_model("opt", "tiny", seed=0, **NO_DROPOUT)
    sigma, clip, q_n = 1.5, 0.7, 3.0
    draws = []
    global_state = torch.get_rng_state()
    for _ in range(2):
        trainer = FirstOrderTrainer(model, SequenceClassificationHead(), lr=1e-3)
        trainer.make_private(
            noise_multiplier=sigma, clip=clip, expected_batch_size=q_n, generator=torch.Generator().manual_seed(7)
        )
        try:
            draws.append(torch.cat([g.flatten() for g in released_gradient(trainer, None)]))  # empty batch
        finally:
            trainer.close()
    assert torch.equal(draws[0], draws[1])  # a function of the generator only
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never touched
    std = float((draws[0] * q_n).std())
    assert abs(std / (sigma * clip) - 1) < 0.05, std  # ~13k coordinates


def test_secret_device_generator():
    g = privacy.secret_device_generator("cpu")
    assert g.device.type == "cpu" and not torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=g))
    with pytest.warns(privacy.NotPrivateWarning):
        a = privacy.secret_device_generator("cpu", debug_seed=5)
    with pytest.warns(privacy.NotPrivateWarning):
        b = privacy.secret_device_generator("cpu", debug_seed=5)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    trainer = FirstOrderTrainer(build_random_model("bert", "tiny", seed=0), SequenceClassificationHead(), lr=1e-3)
    # CPU parameters need a CPU generator (a CUDA one cannot draw for them); no generator at all is refused too
    wrong = privacy.secret_device_generator("cuda") if torch.cuda.is_available() else None
    with pytest.raises(privacy.PrivacyError, match="device"):
        trainer.make_private(noise_multiplier=1.0, clip=1.0, expected_batch_size=1.0, generator=wrong)


def test_empty_batch_is_a_noise_only_update_and_non_private_skips_it():
    model = build_random_model("bert", "tiny", seed=0)
    trainer = FirstOrderTrainer(model, SequenceClassificationHead(), lr=1e-2)
    before = [p.detach().clone() for p in trainer.params]
    assert trainer.step(None).loss is None
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))  # adamw: nothing to learn from
    trainer.make_private(noise_multiplier=1.0, clip=1.0, expected_batch_size=2.0, generator=privacy.secret_generator())
    stats = trainer.step(None)
    trainer.close()
    assert stats.examples == 0 and stats.loss is None
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.params))  # noise moved every tensor


def test_auto_mode_and_tied_parameters():
    untied = build_random_model("opt", "tiny", seed=0)
    assert tied_parameters(untied) == [] and choose_opacus_mode(untied)[0] == "ghost"
    tied = causal_lm()
    assert tied_parameters(tied) == [["model.decoder.embed_tokens.weight", "lm_head.weight"]]
    mode, why = choose_opacus_mode(tied)
    assert mode == "fast" and "tied" in why
    with pytest.raises(OpacusModeError, match="tied"):
        choose_opacus_mode(tied, "ghost")


def test_parameters_used_outside_their_module_are_refused():
    model = causal_lm()
    trainer = FirstOrderTrainer(model, FunctionalLabelWords(), lr=1e-3)
    trainer.make_private(noise_multiplier=1.0, clip=1.0, expected_batch_size=2.0, generator=torch.Generator())
    with pytest.raises(OpacusModeError, match=r"lm_head\.weight|embed_tokens\.weight"):
        trainer.step(random_batch(model, 3, 5, seed=0))
    assert not hasattr(model, "autograd_grad_sample_hooks")  # hooks detached on refusal


def test_compat_rewrites_are_exact_and_undone():
    model = build_random_model("opt", "tiny", seed=0, **NO_DROPOUT)
    batch = random_batch(model, 4, 6, min_length=2, seed=3)
    head = SequenceClassificationHead()
    with torch.no_grad():
        plain = head.per_example_loss(model, batch)
    classes = [type(m) for m in model.modules()]
    trainer = FirstOrderTrainer(model, head, lr=1e-3)
    trainer.make_private(noise_multiplier=1.0, clip=1.0, expected_batch_size=2.0, generator=torch.Generator())
    with torch.no_grad():
        adapted = head.per_example_loss(model, batch)
    trainer.close()
    torch.testing.assert_close(adapted, plain, rtol=0, atol=0)
    assert [type(m) for m in model.modules()] == classes
    assert not any("forward" in vars(m) for m in model.modules())


def test_master_weight_adamw_is_torch_adamw():
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    ours, ref = MasterWeightAdamW(a, lr=1e-2, weight_decay=0.1), torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bf16_trains_with_fp32_master_weights_and_a_clip_margin():
    model = build_random_model("opt", "tiny", seed=0, dtype=torch.bfloat16)
    trainer = FirstOrderTrainer(model, SequenceClassificationHead(), lr=1e-3)
    trainer.make_private(noise_multiplier=1.0, clip=2.0, expected_batch_size=4.0, generator=torch.Generator())
    stats = trainer.step(random_batch(model, 4, 6, seed=0))
    info = trainer.describe()
    trainer.close()
    assert stats.examples == 4 and info["param_dtype"] == "bfloat16" and "master" in info["optimizer"]
    assert info["clip_threshold"] == pytest.approx(2.0 * (1 - HALF_PRECISION_CLIP_MARGIN))
    assert info["noise_std"] == pytest.approx(2.0)  # σ·C: the margin only tightens the clip


# ----------------------------------------------------------------------------- the trainer


def cli_args(assets, out: Path, *extra: str) -> list[str]:
    model_dir, data_dir = assets
    return [
        "--model", str(model_dir), "--task", "local", "--data-dir", str(data_dir), "--trainable", "all",
        "--max-length", "12", "--batch-size", "8", "--steps", "4", "--log-every", "2", "--eval-batch-size", "16",
        "--clip", "1.0", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def test_cli_dp_adamw_and_adamw(assets, tmp_path, capsys):
    out = tmp_path / "dp"
    assert train_main(cli_args(assets, out, "--method", "dp-adamw", "--physical-batch-size", "3")) == 0
    assert "epsilon spent" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["epsilon_spent"] <= 2.0 and summary["first_order"]["opacus_mode"] == "ghost"
    assert summary["forwards"] > 0 and summary["backward_passes"] == 2 * summary["forwards"]
    ledger = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert ledger[0]["backend"] == "opacus-ghost" and ledger[0]["method"] == "dp-adamw" and len(ledger) == 5
    assert [r["epsilon"] for r in ledger[1:]] == sorted(r["epsilon"] for r in ledger[1:])
    assert list((out / "model").glob("*.safetensors")) and not (out / "checkpoint").exists()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m and "split" not in m] == [2, 4]

    plain = tmp_path / "plain"
    assert train_main(cli_args(assets, plain, "--method", "adamw", "--lr", "1e-3")) == 0
    summary = json.loads((plain / "summary.json").read_text())
    assert summary["epsilon_spent"] is None and summary["first_order"]["private"] is False


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "dp-adamw", "--resume"], "--resume is not supported"),
        (["--method", "dp-adamw", "--opacus-mode", "sideways"], "--opacus-mode"),
        (["--method", "adamw", "--opacus-mode", "ghost"], "dp-adamw only"),
        (["--method", "dp-adamw", "--weight-decay", "-1"], "--weight-decay"),
        (["--method", "dp-adamw", "--physical-batch-size", "0"], "--physical-batch-size"),
    ],
)
def test_cli_first_order_bad_input(assets, tmp_path, refused, extra, needle):
    out = tmp_path / "run"
    refused(cli_args(assets, out, *extra), needle)
    assert not out.exists()


def test_replay_refuses_a_first_order_run(assets, tmp_path, capsys):
    from dpzo_engine.replay import main as replay_main

    out = tmp_path / "run"
    assert train_main(cli_args(assets, out, "--method", "adamw", "--steps", "1")) == 0
    capsys.readouterr()
    assert replay_main([str(out)]) == 2
    assert "zeroth-order" in capsys.readouterr().err
