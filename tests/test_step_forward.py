"""A step's forwards: θ-independent inputs built once, batches padded to buckets, the loss compiled.

Exactness, as asserted below: the prepared inputs give the model's own mask and positions bit for
bit; padding rows never reach a released value (their content does not change the real rows'
losses at all) and, on batches of two or more examples, the padded and unpadded losses, released
values and weights are bit-identical (a batch of one example may differ by an ulp: a one-row
matrix product takes BLAS's matrix-vector path); compiled losses agree with eager ones to fp32
rounding (inductor fuses and reorders the element-wise work): 2e-6 relative.
"""

from __future__ import annotations

import pytest
import torch

from dpzo_engine.core import stream
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.heads import SequenceClassificationHead
from dpzo_engine.heads.base import model_inputs
from dpzo_engine.models.inputs import static_inputs, supports_static_inputs
from dpzo_engine.models.last_block import last_block_at, supports_last_block_at
from dpzo_engine.models.loading import build_random_model, random_batch, select_trainable
from dpzo_engine.models.prefix_cache import cached_prefix, frozen_prefix_length
from dpzo_engine.models.step_forward import StepForward, bucket, pad_rows, resolve_compile
from dpzo_engine.zo.engine import ZOEngine
from dpzo_engine.zo.private_zo import PrivateZO

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ["bert", "roberta", "opt", "llama"]
COMPILED_RTOL, COMPILED_ATOL = 2e-6, 1e-6  # inductor's fused element-wise kernels round differently


def sequence_loss(model):
    head = SequenceClassificationHead()
    return head, (lambda b: head.per_example_loss(model, b)), (lambda b: head.prepare(model, b))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("lengths", [[10, 4, 7, 10], [10, 10, 10, 10]], ids=["padded", "full"])
def test_static_inputs_give_the_models_own_hidden_states(arch, attn, lengths):
    model = build_random_model(arch, "tiny", attn_implementation=attn)
    batch = random_batch(model, len(lengths), 10, lengths=lengths)
    prepared = static_inputs(model, batch)
    assert supports_static_inputs(model) and "position_ids" in prepared
    assert prepared["attention_mask"] is None or prepared["attention_mask"].dim() == 4
    assert static_inputs(model, prepared) is prepared  # once per step: a prepared batch is left alone
    with torch.no_grad():
        own = model.base_model(**model_inputs(batch))[0]
        given = model.base_model(**model_inputs(prepared))[0]
    assert torch.equal(own, given)


def test_static_inputs_leave_other_batches_to_the_model():
    model = build_random_model("opt", "tiny")
    rows = {"input_ids": torch.ones(2, 3, 5, dtype=torch.long), "attention_mask": torch.ones(2, 3, 5)}
    assert static_inputs(model, rows) is rows  # [B, C, L]: the causal prompt's candidate rows
    model.config._attn_implementation = "flex_attention"
    assert not supports_static_inputs(model)


LAST_BLOCK_CASES = [
    ("bert", {}),
    ("roberta", {}),
    ("opt", {}),
    ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 16}),
]


@pytest.mark.parametrize(("arch", "extra"), LAST_BLOCK_CASES, ids=["bert", "roberta", "opt", "opt-350m-style"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("lengths", [[12, 5, 9, 12], [12, 12, 12, 12]], ids=["padded", "full"])
def test_last_block_at_the_read_positions_equals_the_whole_block(arch, extra, attn, lengths):
    """At the positions read, the trimmed last block gives the whole block's final hidden states to fp32
    rounding (measured: at most 5e-7 on O(1) values); post-LN OPT-350m-style with its output projection too."""
    model = build_random_model(arch, "tiny", attn_implementation=attn, **extra)
    batch = random_batch(model, 4, 12, lengths=lengths)
    n = batch["attention_mask"].sum(1)
    positions = torch.stack([n - 1, n // 2, torch.zeros_like(n)], 1)  # three positions per example, in any order
    assert supports_last_block_at(model)
    for inputs in (batch, static_inputs(model, batch)):
        with torch.no_grad():
            whole = model.base_model(**model_inputs(inputs))[0]
            with last_block_at(model, positions):
                trimmed = model.base_model(**model_inputs(inputs))[0]
        index = positions.unsqueeze(-1).expand(4, 3, whole.shape[-1])
        torch.testing.assert_close(trimmed.gather(1, index), whole.gather(1, index), rtol=2e-6, atol=1e-6)
    assert "forward" not in vars(last_layer(model))  # the block is itself again


def last_layer(model):
    from dpzo_engine.models.prefix_cache import _blocks

    return _blocks(model)[-1]


def test_last_block_runs_whole_where_it_cannot_be_trimmed():
    positions = torch.zeros(3, 1, dtype=torch.long)
    llama = build_random_model("llama", "tiny")  # no tail written for it
    assert not supports_last_block_at(llama)
    with torch.no_grad(), last_block_at(llama, positions):
        assert "forward" not in vars(last_layer(llama))
    model = build_random_model("roberta", "tiny")
    with last_block_at(model, positions):  # gradients on (DP-AdamW): per-sample hooks need the whole block
        assert "forward" not in vars(last_layer(model))
    select_trainable(model, "head")
    with torch.no_grad(), cached_prefix(model, frozen_prefix_length(model)):  # the cache holds the last block
        cached = vars(last_layer(model))["forward"]
        with last_block_at(model, positions):
            assert vars(last_layer(model))["forward"] is cached
    with torch.no_grad(), last_block_at(model, None):
        assert "forward" not in vars(last_layer(model))


def test_buckets_and_row_padding():
    assert [bucket(n, 8) for n in (1, 7, 8, 9, 17)] == [8, 8, 8, 16, 24]
    assert bucket(5, 1) == 5
    batch = {"input_ids": torch.arange(6).view(3, 2), "labels": torch.tensor([0, 1, 1]), "note": "kept", "c": None}
    padded = pad_rows(batch, 5)
    assert padded["input_ids"].tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]]
    assert padded["labels"].tolist() == [0, 1, 1, 0, 0] and padded["note"] == "kept" and padded["c"] is None
    assert pad_rows(batch, 3) is batch
    with pytest.raises(ValueError):
        pad_rows(batch, 2)
    assert not resolve_compile("auto", torch.device("cpu")) and resolve_compile("auto", torch.device("cuda"))
    with pytest.raises(ValueError):
        resolve_compile("sometimes", torch.device("cpu"))


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_rows_never_reach_the_real_rows(arch):
    """The real rows' losses do not depend on what fills the padding (bit for bit), and equal the unpadded
    losses bit for bit from two examples on (one example: within an ulp)."""
    model = build_random_model(arch, "small")
    _, loss, prepare = sequence_loss(model)
    plain = StepForward(loss, "cpu", "off", prepare=prepare)
    padded = StepForward(loss, "cpu", "off", batch_multiple=8, prepare=prepare)
    with torch.no_grad():
        for n in (1, 2, 5, 8, 11):
            lengths = [13, *torch.randint(2, 14, (15,), generator=torch.Generator().manual_seed(n)).tolist()]
            batch = random_batch(model, n, 13, lengths=lengths[:n], seed=n)
            other = random_batch(model, 16, 13, lengths=lengths, seed=100 + n)  # unrelated rows as the padding
            filled = {k: torch.cat([v, other[k][: 16 - n]]) for k, v in batch.items()}
            garbage = loss(prepare(filled))[:n]
            ours, unpadded = padded.bind(batch)(), plain.bind(batch)()
            assert torch.equal(ours, garbage)
            if n > 1:
                assert torch.equal(ours, unpadded)
            else:
                torch.testing.assert_close(ours, unpadded, rtol=1e-6, atol=0)
    assert padded.stats.padded_rows == (7 + 6 + 3 + 0 + 5) and plain.stats.padded_rows == 0


def test_padding_changes_no_released_value():
    """Three private DP-AggZO steps on Poisson batches: released values and weights with batches padded to
    multiples of 8 equal those without padding, bit for bit (the same debug noise seed for both)."""

    def run(multiple: int):
        model = build_random_model("roberta", "small", seed=0)
        data = random_batch(model, 40, 12, min_length=3, seed=5)
        _, loss, prepare = sequence_loss(model)
        forward = StepForward(loss, "cpu", "off", batch_multiple=multiple, prepare=prepare)
        zo = PrivateZO.make(
            model, num_examples=40, steps=3, batch_size=6, epsilon=2.0, noise_seed=11, num_directions=4,
            lr=1e-2, backend="reference",
        )  # fmt: skip
        released = []
        for _ in range(3):
            idx = zo.sample()
            assert len(idx) >= 2  # this seed draws no batch of one (see test_padding_rows_never_reach_the_real_rows)
            batch = {k: v[idx] for k, v in data.items()}
            released.append(zo.step(forward.bind(batch)).released.grad)
        return released, zo.flat.buffers, forward.stats.padded_rows

    with pytest.warns(UserWarning):  # the debug noise seed warns loudly
        padded, padded_weights, rows = run(8)
        plain, plain_weights, none = run(1)
    assert rows > 0 and none == 0
    assert all(torch.equal(a, b) for a, b in zip(padded, plain))
    assert all(torch.equal(a, b) for a, b in zip(padded_weights, plain_weights))


@pytest.mark.slow  # one torch.compile of a tiny model: tens of seconds of inductor C++ builds on 2 cores
def test_compiled_bucketed_losses_match_eager_through_zo_steps():
    """Compiled (symbolic shapes, one compilation) and bucketed losses agree with eager unpadded ones at
    every batch size, through the perturbations of ZO steps, with the frozen-prefix cache on."""

    def run(compile: str, multiple: int) -> tuple[list[torch.Tensor], StepForward]:
        model = build_random_model("roberta", "tiny", seed=0)
        select_trainable(model, "last:1")
        engine = ZOEngine(FlatParams(model), backend="reference")
        _, loss, prepare = sequence_loss(model)
        forward = StepForward(loss, "cpu", compile, batch_multiple=multiple, prepare=prepare)
        length = frozen_prefix_length(model)
        assert length == 1
        seen = []
        for t, n in enumerate((3, 6, 5)):
            step_loss = forward.bind(random_batch(model, n, 9 + t, min_length=2, seed=t))
            seeds = stream.step_seeds(1, t, 2)
            with torch.no_grad(), cached_prefix(model, length):
                engine.estimate(lambda step_loss=step_loss: seen.append(step_loss()) or seen[-1], seeds, 1e-2)
                engine.finish(seeds, 1e-2, [0.05, -0.05])
        return seen, forward

    eager, _ = run("off", 1)
    compiled, forward = run("on", 4)
    assert len(eager) == len(compiled) == 3 * 4
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=COMPILED_RTOL, atol=COMPILED_ATOL)
    assert forward.compiled and forward.stats.first_call_s > 0
    assert forward.stats.padded_rows == 4 * (1 + 2 + 3)
