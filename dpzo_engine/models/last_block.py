"""The last transformer block computed at the positions the loss reads, not at every position.

A prompt head reads the final hidden state at one position per example (the mask, the last prompt
token), a generation head at the answer's positions. Every block but the last must run at all
positions, since its outputs are the keys and values of the block above; the last block's output,
though, is read only there. Inside ``last_block_at`` the last block computes its keys and values
from all positions and everything else (queries, attention output, feed-forward, norms) at the
read positions only, and hands the model back its input with those positions replaced: what follows
the block stack (final norms, projections) works position by position, so the positions read are
exact. The other positions hold the block's input and must not be read.

It saves about (1 − P/T) of the last block minus its key and value projections: a fifth of a
forward for the four-block model of ``bench/step_time.py``, 3–4 % for 24 blocks. Families whose
block structure is written here (BERT, RoBERTa, XLM-R, OPT) are trimmed, each tested against its
full block; any other model, a block already replaced (the frozen-prefix cache), or a forward with
gradients (DP-AdamW: per-sample gradient hooks expect the full block) runs untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .prefix_cache import _blocks

ATTENTIONS = ("eager", "sdpa")


def _gather(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x[b, positions[b, p]] for each b, p: [B, P, H]."""
    return x.gather(1, positions.unsqueeze(-1).expand(*positions.shape, x.shape[-1]))


def _mask_rows(mask: torch.Tensor | None, positions: torch.Tensor, length: int, causal: bool) -> torch.Tensor | None:
    """The rows of the block's [B, 1, T, T] attention mask at the read positions: [B, 1, P, T]."""
    if mask is not None:
        B, P = positions.shape
        return mask.gather(2, positions[:, None, :, None].expand(B, mask.shape[1], P, mask.shape[-1]))
    if not causal:
        return None
    keys = torch.arange(length, device=positions.device)
    return (keys <= positions[..., None]).unsqueeze(1)  # no padding: position p sees keys 0..p


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _bert_tail(block: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, mask) -> torch.Tensor:
    """BertLayer / RobertaLayer / XLMRobertaLayer (post-LN): attention output, then the feed-forward."""
    sa = block.attention.self
    at = _gather(hidden, positions)
    q = _heads(sa.query(at), sa.attention_head_size)
    k, v = _heads(sa.key(hidden), sa.attention_head_size), _heads(sa.value(hidden), sa.attention_head_size)
    rows = _mask_rows(mask, positions, hidden.shape[1], causal=False)
    context = _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=rows, scale=sa.scaling))
    return block.feed_forward_chunk(block.attention.output(context, at))


def _opt_tail(block: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, mask) -> torch.Tensor:
    """OPTDecoderLayer: pre-LN (125m, 1.3b, ...) or post-LN (350m), causal self-attention, feed-forward."""
    attn, pre = block.self_attn, block.do_layer_norm_before
    normed = block.self_attn_layer_norm(hidden) if pre else hidden  # keys and values see every position
    at = _gather(normed, positions)
    q = _heads(attn.q_proj(at) * attn.scaling, attn.head_dim)
    k, v = _heads(attn.k_proj(normed), attn.head_dim), _heads(attn.v_proj(normed), attn.head_dim)
    rows = _mask_rows(mask, positions, hidden.shape[1], causal=True)
    out = _gather(hidden, positions) + attn.out_proj(_merge(F.scaled_dot_product_attention(q, k, v, rows, scale=1.0)))
    if not pre:
        out = block.self_attn_layer_norm(out)
    ffn_in = block.final_layer_norm(out) if pre else out
    out = out + block.fc2(block.activation_fn(block.fc1(ffn_in)))
    return out if pre else block.final_layer_norm(out)


TAILS: dict[str, Callable] = {"bert": _bert_tail, "roberta": _bert_tail, "xlm-roberta": _bert_tail, "opt": _opt_tail}


def supports_last_block_at(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.model_type not in TAILS or getattr(cfg, "_attn_implementation", None) not in ATTENTIONS:
        return False
    return cfg.model_type == "opt" or not (cfg.is_decoder or getattr(cfg, "add_cross_attention", False))


@contextmanager
def last_block_at(model: nn.Module, positions: torch.Tensor | None) -> Iterator[None]:
    """Within the block, forwards compute the last block at ``positions`` [B, P] only (see the module
    docstring); None, an unsupported model or gradients on: forwards run untouched."""
    if positions is None or torch.is_grad_enabled() or not supports_last_block_at(model):
        yield
        return
    block = _blocks(model)[-1]
    if "forward" in vars(block):  # already replaced (the frozen-prefix cache holds it): leave it
        yield
        return
    tail = TAILS[model.config.model_type]

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        plain = all(a is None for a in args) and all(
            kwargs.get(k) is None for k in ("past_key_values", "encoder_hidden_states", "encoder_attention_mask")
        )  # BERT passes encoder_hidden_states positionally (None); a cache or cross-attention is not a plain pass
        if not plain:
            return type(block).forward(block, hidden_states, attention_mask, *args, **kwargs)  # not a plain pass
        at = tail(block, hidden_states, positions, attention_mask)
        index = positions.unsqueeze(-1).expand(*positions.shape, hidden_states.shape[-1])
        return hidden_states.scatter(1, index, at.to(hidden_states.dtype))

    block.forward = forward  # instance attribute shadows the method
    try:
        yield
    finally:
        del block.forward
