"""Model inputs that do not depend on θ, built once per step instead of in each of its 2K forwards.

On every call a transformers model turns the 2D padding mask into the mask its attention reads,
and derives position ids (and RoBERTa's token types) from the ids. In a ZO step the batch is the
same for every forward, so ``static_inputs`` builds these once, with the model's own functions,
and the forwards take them as given (a prepared 4D mask is passed through as is). Only the
families whose rules are written here are prepared, each tested bit for bit against the model's
own forward; any other model gets its batch back unchanged and builds them itself, as before.

What it saves is small in eager mode (the mask and positions are a few small ops per forward; the
profile in ``bench/step_time.py --profile`` shows how small), but it leaves the compiled forward
(``models.step_forward``) a graph of the network alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Batch = dict[str, Any]

ENCODERS = ("bert", "roberta", "xlm-roberta")  # bidirectional mask
DECODERS = ("opt", "llama")  # causal mask
ATTENTIONS = ("eager", "sdpa")  # flash / flex attention take their masks in other forms: left to the model


def supports_static_inputs(model: nn.Module) -> bool:
    """Whether ``static_inputs`` prepares this model's inputs (else it returns the batch as is)."""
    cfg = getattr(model, "config", None)
    if cfg is None or (getattr(cfg, "is_decoder", False) and cfg.model_type in ENCODERS):
        return False
    return cfg.model_type in ENCODERS + DECODERS and getattr(cfg, "_attn_implementation", None) in ATTENTIONS


def static_inputs(model: nn.Module, batch: Batch) -> Batch:
    """``batch`` with the model's attention mask in its final form and the position ids (token types for
    encoders) filled in. A batch that already carries position ids, or whose ids are not [B, T], is
    returned unchanged."""
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if not supports_static_inputs(model) or ids is None or ids.dim() != 2 or "position_ids" in batch:
        return batch
    if mask is not None and mask.dim() != 2:
        return batch
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    cfg = model.config
    B, T = ids.shape
    dtype = model.get_input_embeddings().weight.dtype
    shape_only = torch.empty(B, T, 0, dtype=dtype, device=ids.device)  # what the mask helpers read: B, T, dtype
    out = dict(batch)
    if cfg.model_type in ENCODERS:
        embeddings = model.base_model.embeddings
        if hasattr(embeddings, "create_position_ids_from_input_ids"):  # RoBERTa: counted from the padding id
            out["position_ids"] = embeddings.create_position_ids_from_input_ids(ids, embeddings.padding_idx)
        else:  # BERT: 0 .. T-1
            out["position_ids"] = torch.arange(T, device=ids.device).expand(B, T)
        if "token_type_ids" not in batch and hasattr(embeddings, "token_type_ids"):
            out["token_type_ids"] = torch.zeros_like(ids)  # what the model's all-zero buffer gives
        out["attention_mask"] = create_bidirectional_mask(config=cfg, inputs_embeds=shape_only, attention_mask=mask)
    elif cfg.model_type == "opt":
        counted = mask if mask is not None else torch.ones_like(ids)
        out["position_ids"] = (torch.cumsum(counted, dim=1) * counted - 1).long()
        out["attention_mask"] = create_causal_mask(
            config=cfg, inputs_embeds=shape_only, attention_mask=mask, past_key_values=None
        )
    else:  # llama: 0 .. T-1 (right padding), one row per example so that the batch can be sliced
        positions = torch.arange(T, device=ids.device).expand(B, T)
        out["position_ids"] = positions
        out["attention_mask"] = create_causal_mask(
            config=cfg, inputs_embeds=shape_only, attention_mask=mask, past_key_values=None, position_ids=positions
        )
    return out
