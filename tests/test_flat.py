"""Flat parameter buffer: views, order, tied weights, frozen parameters, offsets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM, RobertaConfig, RobertaForMaskedLM

from dpzo_engine import ops
from dpzo_engine.core.flat import FlatParams


def tiny_opt() -> nn.Module:
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_roberta_mlm() -> nn.Module:
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        intermediate_size=32,
        num_attention_heads=2,
        max_position_embeddings=40,
    )
    return RobertaForMaskedLM(cfg).eval()


@pytest.mark.parametrize("build", [tiny_opt, tiny_roberta_mlm])
def test_tied_weights_appear_once_and_stay_tied(build):
    model = build()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb is head  # both architectures tie the LM head to the embeddings
    flat = FlatParams(model)
    unique = {id(p) for p in model.parameters()}
    assert len(flat.slots) == len(unique)
    assert flat.numel == sum(p.numel() for p in model.parameters())
    flat.buffers[0].zero_()
    assert model.get_output_embeddings().weight.abs().sum() == 0  # still the same storage


def test_order_offsets_and_views():
    model = tiny_opt()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    flat = FlatParams(model)
    assert flat.names() == names  # documented order: named_parameters()
    running = 0
    params = dict(model.named_parameters())
    for name in names:
        assert flat.offset_of(name) == running
        p = params[name]
        assert p.data_ptr() == flat.buffers[0][running:].data_ptr()
        running += p.numel()
    with pytest.raises(KeyError):
        flat.offset_of("nope")


def test_frozen_parameters_stay_outside():
    model = tiny_opt()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.decoder.layers.1."))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    flat = FlatParams(model)
    assert all(n.startswith("model.decoder.layers.1.") for n in flat.names())
    ops.apply_directions(flat.buffers[0], torch.tensor([1]), torch.tensor([0.5]), backend="reference")
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n])


def test_perturbing_the_buffer_moves_the_model_by_the_parameter_slice():
    model = tiny_opt()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    flat = FlatParams(model)
    assert torch.equal(model(ids).logits, before)  # re-pointing keeps the values
    name = "model.decoder.layers.0.fc1.weight"
    w0 = dict(model.named_parameters())[name].detach().clone()
    ops.apply_directions(flat.buffers[0], torch.tensor([9]), torch.tensor([1e-2]), backend="reference")
    w1 = dict(model.named_parameters())[name].detach()
    z = ops.directions(9, flat.offset_of(name), w0.numel()).view_as(w0)
    assert torch.equal(w1, w0 + torch.tensor(1e-2) * z)
    assert not torch.equal(model(ids).logits, before)


def test_one_buffer_per_dtype_with_global_offsets():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).to(torch.bfloat16), nn.Linear(2, 2))
    flat = FlatParams(model)
    assert [b.dtype for b in flat.buffers] == [torch.float32, torch.bfloat16]
    assert flat.buffer_offsets == [0, 12 + 4 + 4 + 2]
    assert flat.offset_of("1.weight") == 22
    assert flat.offset_of("2.weight") == 16


def test_nothing_trainable_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParams(model)
