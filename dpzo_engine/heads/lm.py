"""Language-model heads without full-vocabulary logits: run the base model, gather, then decode.

A prompt head needs logits at one position (the mask, or the last prompt token) and often only
for a few token ids (the label words). ``AutoModelFor*LM.forward`` would compute [B, L, V]
logits (RoBERTa-large, 128 tokens, batch 64: 1.6 GB in fp32); these helpers run the base model,
gather the hidden states that matter and apply the LM head to them alone, restricted to the
wanted rows of the output embedding when the loss allows it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, HeadError, model_inputs

LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def final_hidden(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Last hidden states [B, L, H] of the model's base (final norms included, no LM head)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise HeadError(f"{type(model).__name__} has no separate base model to take hidden states from")
    out = base(**model_inputs(batch))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def output_embedding(model: nn.Module) -> nn.Linear:
    """The LM head's vocabulary projection (a plain Linear, weight [V, H]); other heads are refused."""
    decoder = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Linear):
        raise HeadError(f"{type(model).__name__} has no language-model head (a prompt head needs one)")
    for attr in LOGIT_POSTPROCESSING:
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            raise HeadError(f"{type(model).__name__} rescales its logits ({attr}); prompt heads do not support it")
    return decoder


def vocab_logits(decoder: nn.Linear, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits [N, V] of ``hidden`` [N, H], or [N, C] for the vocabulary rows ``token_ids`` only.

    Without gradients (every ZO forward) or with a frozen projection, only the ``token_ids`` rows
    of the weight are multiplied. When the projection (weight or bias) trains with gradients (DP-AdamW
    with the embeddings or the LM head trainable), the decoder is called as a module on the gathered
    rows, so per-example gradient hooks (Opacus) see, and clip, its gradient too.
    """
    if torch.is_grad_enabled() and any(p.requires_grad for p in decoder.parameters()):
        logits = decoder(hidden)
        return (logits if token_ids is None else logits.index_select(-1, token_ids)).float()
    weight, bias = decoder.weight, decoder.bias
    if token_ids is not None:
        weight = weight.index_select(0, token_ids)
        bias = bias.index_select(0, token_ids) if bias is not None else None
    return F.linear(hidden, weight, bias).float()


def mlm_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The masked-LM head up to (not including) its vocabulary projection."""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and all(hasattr(lm_head, a) for a in ("dense", "layer_norm", "decoder")):
        return lambda h: lm_head.layer_norm(F.gelu(lm_head.dense(h)))  # RobertaLMHead (RoBERTa, XLM-R, ...)
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None and hasattr(predictions, "transform"):
        return predictions.transform  # BertLMPredictionHead (BERT, ...)
    raise HeadError(
        f"{type(model).__name__}: the masked-LM prompt head supports RoBERTa- and BERT-style MLM heads; "
        "use --head sequence-classification"
    )


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden[rows[i], positions[i]] for each i: [N, H]."""
    return hidden[rows, positions]
