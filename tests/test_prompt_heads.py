"""Prompt heads (masked-LM verbalizer, causal-LM candidates, causal-LM generation) on tiny random
models with real byte-level BPE tokenizers: against the full model's logits, per example, with
padding, in bf16, with gradients; templates and their tokenization; SQuAD metrics; auto choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_fixtures import (
    bpe_tokenizer,
    nli_examples,
    sentencepiece_tokenizer,
    sentiment_examples,
    squad_examples,
    tiny_lm,
)

from dpzo_engine.data import Example, Prompt, TaskData
from dpzo_engine.data.prompts import CB, NLI3, RTE, SENTIMENT2, SQUAD, TREC, TemplateError, parse_template
from dpzo_engine.heads import (
    CausalGenerationHead,
    CausalPromptHead,
    HeadError,
    MaskedLMPromptHead,
    build_head,
    evaluate,
    resolve_head,
)
from dpzo_engine.heads.metrics import best_exact_match, best_f1, normalize_answer
from dpzo_engine.heads.prompting import PromptEncoder, fit_lengths, special_framing
from dpzo_engine.models.last_block import last_block_at

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def alone(head, model, tok, examples, max_length=64):
    """Each example's loss from a batch of one (no padding)."""
    with torch.no_grad():
        return torch.cat([head.per_example_loss(model, head.collate([e], tok, max_length)) for e in examples])


def check_batch_independent(head, model, tok, examples, max_length=64):
    batch = head.collate(examples, tok, max_length)
    assert (batch["attention_mask"].sum(-1) < batch["attention_mask"].shape[-1]).any()  # some rows are padded
    for key, value in batch.items():  # the contract: micro-batches are slices of the first dimension
        assert value.shape[0] == len(examples), key
    with torch.no_grad():
        losses = head.per_example_loss(model, batch)
        flipped = head.per_example_loss(model, head.collate(examples[::-1], tok, max_length))
        step_batch = head.prepare(model, batch)  # a ZO step's form: mask built once, last block where read
        prepared = head.per_example_loss(model, step_batch)
        with last_block_at(model, head.read_positions(model, step_batch)):
            trimmed = head.per_example_loss(model, step_batch)
    assert torch.equal(prepared, losses)
    torch.testing.assert_close(trimmed, losses, atol=2e-6, rtol=2e-6)
    assert losses.shape == (len(examples),) and losses.dtype == torch.float32 and torch.isfinite(losses).all()
    torch.testing.assert_close(losses, alone(head, model, tok, examples, max_length), atol=2e-5, rtol=0)
    torch.testing.assert_close(flipped, losses.flip(0), atol=2e-5, rtol=0)
    return batch, losses


# ----------------------------------------------------------------------------- templates


def render(template: str, example: Example, slot_text: str) -> str:
    """The string LM-BFF / MeZO would feed the tokenizer (slot filled with ``slot_text``)."""
    from dpzo_engine.data.prompts import apply_modifiers

    out = ""
    for s in parse_template(template):
        if s.kind == "literal":
            out += s.value
        elif s.kind == "slot":
            out += slot_text
        else:
            out += s.lead + apply_modifiers(getattr(example, s.value) or "", s.modifiers)
    return out


def test_template_parsing_modifiers_and_causal_variants():
    segments = parse_template("{text|nopunct}? {mask}, {text_pair|lowerfirst}")
    assert [(s.kind, s.value, s.lead) for s in segments] == [
        ("field", "text", ""), ("literal", "?", ""), ("slot", "mask", " "), ("literal", ",", ""),
        ("field", "text_pair", " "),
    ]  # fmt: skip
    assert render(NLI3.template, Example("A man walks.", 0, "He walks"), "<mask>") == "A man walks?<mask>, he walks"
    assert SENTIMENT2.causal() == "{text} It was {mask}"  # MeZO's SST-2 prompt, derived from LM-BFF's
    assert NLI3.causal().startswith("Suppose {text} Can we infer") and TREC.causal() is None
    assert SQUAD.is_generation and SQUAD.causal() is None and not SENTIMENT2.is_generation
    for bad in ("{text} {oops}", "{text}", "{mask} {answer}", "{text|upper} {mask}"):
        with pytest.raises(TemplateError):
            parse_template(bad)
    with pytest.raises(TemplateError, match="must end with"):
        Prompt(None, ("a", "b"), "{mask} then {text}")


@pytest.mark.parametrize("style", ["roberta", "opt", "llama", "sentencepiece"])
@pytest.mark.parametrize("prompt", [SENTIMENT2, NLI3, RTE, CB], ids=["sst2", "nli", "rte", "cb"])
def test_piecewise_tokenization_matches_the_rendered_string(style, prompt):
    # SentencePiece puts "▁" before every text it is given: pieces inside the prompt must not get one
    tok = sentencepiece_tokenizer() if style == "sentencepiece" else bpe_tokenizer(style)
    examples = nli_examples() if "text_pair" in (prompt.causal() or "") else sentiment_examples()
    encoder = PromptEncoder(prompt.causal(), tok, closing_special=False)
    prefix, _ = special_framing(tok)
    for e, enc in zip(examples, encoder.encode(examples, 128, [1] * len(examples))):
        word = prompt.label_words[0]
        whole = tok(render(prompt.causal(), e, encoder.slot.lead + word), add_special_tokens=False)["input_ids"]
        candidate = encoder.tokens([encoder.slot.lead + word])[0]
        assert enc.before + candidate == prefix + whole
    if style == "roberta":  # the masked-LM template, mask and closing token included
        encoder = PromptEncoder(prompt.template, tok)
        for e, enc in zip(examples, encoder.encode(examples, 128, [1] * len(examples))):
            whole = tok(render(prompt.template, e, tok.mask_token))["input_ids"]
            assert [*enc.before, tok.mask_token_id, *enc.after] == whole


def test_wordpiece_tokenization_matches_too():
    from transformers import AutoTokenizer

    from dpzo_engine.models.loading import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    encoder = PromptEncoder(NLI3.template, tok)
    for e, enc in zip(nli_examples(), encoder.encode(nli_examples(), 64, [1] * 3)):
        whole = tok(render(NLI3.template, e, tok.mask_token))["input_ids"]
        assert [*enc.before, tok.mask_token_id, *enc.after] == whole


def test_truncation_keeps_template_and_slot():
    assert fit_lengths([10, 3], 8) == [5, 3] and fit_lengths([10, 10], 9) == [5, 4] and fit_lengths([2, 3], 9) == [2, 3]
    tok = bpe_tokenizer("roberta")
    head = MaskedLMPromptHead(SENTIMENT2)
    long = Example(" ".join(["the cat sat on the mat"] * 20), 1)
    batch = head.collate([long, Example("a dull film", 0)], tok, max_length=16)
    assert batch["input_ids"].shape == (2, 16)
    row = batch["input_ids"][0].tolist()
    assert row[batch["mask_positions"][0]] == tok.mask_token_id and row[-1] == tok.eos_token_id
    assert tok.decode(row[-5:-1]).endswith(" It was<mask>.")  # the template's tail survived
    with pytest.raises(HeadError, match="--max-length 4 is too short for the template"):
        head.collate([long], tok, max_length=4)


# ----------------------------------------------------------------------------- masked-LM prompt head


@pytest.mark.parametrize("arch", ["roberta", "bert"])
def test_mlm_head_equals_full_logits_at_the_mask(arch):
    model, tok = tiny_lm(arch, "mlm-prompt")
    head = MaskedLMPromptHead(SENTIMENT2)
    batch, losses = check_batch_independent(head, model, tok, sentiment_examples())
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = torch.arange(len(losses))
        expected = full[rows, batch["mask_positions"]][:, head.label_token_ids].float()
        scores = head.class_scores(model, batch)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses, F.cross_entropy(expected, batch["labels"], reduction="none"))
    assert head.label_token_ids.tolist() == [tok(" terrible")["input_ids"][1], tok(" great")["input_ids"][1]]


def test_mlm_head_refuses_multi_token_words_and_missing_mask():
    tok = bpe_tokenizer("roberta")
    with pytest.raises(HeadError, match="label word 'Description' is 8 tokens"):
        MaskedLMPromptHead(TREC).collate([Example("What is it?", 0)], tok, 32)
    with pytest.raises(HeadError, match="has no mask token"):
        MaskedLMPromptHead(SENTIMENT2).collate(sentiment_examples(), bpe_tokenizer("opt"), 32)


# ----------------------------------------------------------------------------- causal-LM prompt head


def candidate_loglik(model, tok, prompt_ids: list[int], candidate: list[int]) -> torch.Tensor:
    """Mean log-likelihood of ``candidate`` after ``prompt_ids`` from the full model (reference)."""
    ids = torch.tensor([prompt_ids + candidate])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return torch.stack([logp[len(prompt_ids) + j - 1, t] for j, t in enumerate(candidate)]).mean()


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("words", [("terrible", "great"), ("terrible fun", "great movie", "dull film")])
def test_causal_prompt_head_equals_candidate_log_likelihoods(arch, words):
    model, tok = tiny_lm(arch, "causal-prompt")
    head = CausalPromptHead(Prompt("{text} It was {mask}.", words))
    examples = [Example(e.text, e.label % len(words)) for e in sentiment_examples()]
    batch, losses = check_batch_independent(head, model, tok, examples)
    assert batch["input_ids"].dim() == (2 if len(words) == 2 else 3)  # the shared-prompt fast path for one token
    assert head.expands_rows == (len(words) > 2)
    encoder = PromptEncoder(head.template, tok, closing_special=False)
    candidates = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    with torch.no_grad():
        prompts = [enc.before for enc in encoder.encode(examples, 64, [3] * len(examples))]
        ref = torch.tensor([[candidate_loglik(model, tok, p, c) for c in candidates] for p in prompts])
        scores = head.class_scores(model, batch)
    labels = batch["labels"]
    torch.testing.assert_close(losses, F.cross_entropy(ref, labels, reduction="none"), atol=2e-5, rtol=0)
    if len(words) > 2:
        torch.testing.assert_close(scores, ref, atol=2e-5, rtol=0)  # the scores are the mean log-likelihoods
    assert torch.equal(head.predict(model, batch), ref.argmax(-1))


# ----------------------------------------------------------------------------- causal-LM generation head


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_generation_loss_is_mean_answer_nll(arch):
    model, tok = tiny_lm(arch, "causal-generation")
    head = CausalGenerationHead(SQUAD, max_new_tokens=4)
    examples = squad_examples()
    batch, losses = check_batch_independent(head, model, tok, examples)
    assert batch["labels"].tolist() == [-1, -1, -1]
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    for i, e in enumerate(examples):
        target = tok(" " + e.answers[0] + "\n", add_special_tokens=False)["input_ids"]
        start = int(batch["target_starts"][i])
        assert batch["input_ids"][i, start : start + len(target)].tolist() == target
        nll = F.cross_entropy(full[i, start - 1 : start - 1 + len(target)], torch.tensor(target))
        torch.testing.assert_close(losses[i], nll, atol=2e-5, rtol=0)


def test_greedy_generation_is_per_example_and_stops_at_the_newline():
    model, tok = tiny_lm("llama", "causal-generation", seed=3)
    head = CausalGenerationHead(SQUAD, max_new_tokens=6)
    examples = squad_examples()
    with torch.no_grad():
        together = head.generate(model, examples, tok, 64)
        each = [head.generate(model, [e], tok, 64)[0] for e in examples]
    assert together == each and all("\n" not in a for a in together)
    _, stops = head._encoder(tok)
    assert tok.eos_token_id in stops and tok("\n", add_special_tokens=False)["input_ids"][0] in stops
    metrics = evaluate(model, head, examples, tok, batch_size=2, max_length=64)
    assert set(metrics) == {"f1", "exact_match", "loss", "n"} and metrics["n"] == 3
    assert 0 <= metrics["exact_match"] <= metrics["f1"] <= 1


def test_squad_metrics():
    assert normalize_answer("The  Broncos!") == "broncos"
    assert best_exact_match("the Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert best_f1("Denver", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert best_f1("Paris", ["London"]) == 0.0 and best_f1("", ["x"]) == 0.0


# ----------------------------------------------------------------------------- all heads


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("roberta", MaskedLMPromptHead(SENTIMENT2)),
        ("opt", CausalPromptHead(SENTIMENT2)),
        ("llama", CausalGenerationHead(SQUAD)),
    ],
    ids=["mlm", "causal", "generation"],
)
def test_heads_leave_gradients_on_and_give_fp32_in_bf16(arch, head):
    examples = squad_examples() if isinstance(head, CausalGenerationHead) else sentiment_examples()
    model, tok = tiny_lm(arch, head.name)
    loss = head.per_example_loss(model, head.collate(examples, tok, 64)).sum()
    assert loss.requires_grad  # DP-AdamW backpropagates through the same heads
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    bf16, tok = tiny_lm(arch, head.name, dtype=torch.bfloat16)
    with torch.no_grad():
        losses = head.per_example_loss(bf16, head.collate(examples, tok, 64))
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()


def task(prompt: Prompt | None, generation: bool = False) -> TaskData:
    ex = squad_examples() if generation else sentiment_examples()
    return TaskData("t", () if generation else ("neg", "pos"), ex, ex, ex, prompt=prompt)


def test_auto_head_follows_task_and_model():
    assert resolve_head("auto", task(SENTIMENT2), "masked-lm") == "mlm-prompt"
    assert resolve_head("auto", task(SENTIMENT2), "causal-lm") == "causal-prompt"
    assert resolve_head("auto", task(SENTIMENT2), "encoder") == "sequence-classification"  # MiniLM: no MLM head
    assert resolve_head("auto", task(TREC), "causal-lm") == "sequence-classification"  # no causal template
    assert resolve_head("auto", task(None), "masked-lm") == "sequence-classification"
    assert resolve_head("auto", task(SQUAD, True), "causal-lm") == "causal-generation"
    assert resolve_head("sequence-classification", task(SENTIMENT2), "causal-lm") == "sequence-classification"
    with pytest.raises(HeadError, match="needs a causal LM"):
        resolve_head("auto", task(SQUAD, True), "masked-lm")
    with pytest.raises(HeadError, match="needs --head causal-generation"):
        resolve_head("causal-prompt", task(SQUAD, True), "causal-lm")
    with pytest.raises(HeadError, match="needs a masked LM"):
        resolve_head("mlm-prompt", task(SENTIMENT2), "encoder")
    with pytest.raises(HeadError, match="classification task"):
        resolve_head("causal-generation", task(SENTIMENT2), "causal-lm")
    with pytest.raises(HeadError, match="no prompt template"):
        build_head("mlm-prompt", task(None))
    with pytest.raises(HeadError, match="no causal-LM prompt"):
        build_head("causal-prompt", task(TREC))
