"""Loss heads: examples → batches → one per-example loss vector from one batched forward.

* ``sequence-classification``: the model's classifier (``AutoModelForSequenceClassification``).
* ``mlm-prompt``: LM-BFF prompts for masked LMs (RoBERTa): label-word logits at the mask.
* ``causal-prompt``: MeZO prompts for causal LMs (OPT): candidates' mean log-likelihood.
* ``causal-generation``: answer NLL for training, greedy decoding with F1 / EM for evaluation.

``resolve_head`` turns ``auto`` into one of these from the task and the kind of model.
"""

from __future__ import annotations

from typing import Any

from ..data import TaskData
from .base import (
    MODEL_INPUTS,
    Batch,
    ClassificationHead,
    HeadError,
    LossHead,
    count_at_length,
    model_inputs,
    move_batch,
)
from .causal_generation import CausalGenerationHead
from .causal_prompt import CausalPromptHead
from .evaluate import evaluate
from .mlm_prompt import MaskedLMPromptHead
from .sequence import SequenceClassificationHead

HEAD_CLASSES: dict[str, type[LossHead]] = {
    cls.name: cls for cls in (SequenceClassificationHead, MaskedLMPromptHead, CausalPromptHead, CausalGenerationHead)
}
HEAD_CHOICES = ("auto", *HEAD_CLASSES)
MODEL_KINDS = ("masked-lm", "causal-lm", "encoder")  # what models.model_kind reports
NEEDS_KIND = {"mlm-prompt": "masked-lm", "causal-prompt": "causal-lm", "causal-generation": "causal-lm"}


def get_head(name: str = "sequence-classification", **kwargs: Any) -> LossHead:
    if name not in HEAD_CLASSES:
        raise HeadError(f"unknown loss head '{name}' (available: {', '.join(HEAD_CLASSES)})")
    return HEAD_CLASSES[name](**kwargs)


def resolve_head(requested: str, task: TaskData, model_kind: str) -> str:
    """The head for ``task`` on a model of ``model_kind``: ``auto`` picks the papers' setting
    (masked LM + a prompt → mlm-prompt, causal LM → causal-prompt or causal-generation, anything
    else → sequence-classification); an explicit choice is checked against both."""
    prompt = task.prompt
    if requested == "auto":
        if task.is_generation:
            requested = "causal-generation"
        elif model_kind == "masked-lm" and prompt is not None and prompt.template is not None:
            requested = "mlm-prompt"
        elif model_kind == "causal-lm" and prompt is not None and prompt.causal() is not None:
            requested = "causal-prompt"
        else:
            requested = "sequence-classification"
    if requested not in HEAD_CLASSES:
        raise HeadError(f"unknown loss head '{requested}' (available: {', '.join(HEAD_CHOICES)})")
    if task.is_generation and requested != "causal-generation":
        raise HeadError(f"task '{task.name}' generates answers: it needs --head causal-generation (or auto)")
    if requested == "causal-generation" and not task.is_generation:
        raise HeadError(f"task '{task.name}' is a classification task; --head causal-generation needs one like squad")
    needed = NEEDS_KIND.get(requested)
    if needed is not None and model_kind != needed:
        what = "a masked LM (RoBERTa; BERT with its MLM head)" if needed == "masked-lm" else "a causal LM (OPT, Llama)"
        raise HeadError(f"--head {requested} needs {what}; this model is a {model_kind}")
    return requested


def build_head(name: str, task: TaskData, **kwargs: Any) -> LossHead:
    """An instance of head ``name`` configured with the task's prompt."""
    if name == SequenceClassificationHead.name:
        return SequenceClassificationHead(**kwargs)
    if task.prompt is None:
        raise HeadError(f"task '{task.name}' has no prompt template; use --head sequence-classification")
    return get_head(name, prompt=task.prompt, **kwargs)


__all__ = [
    "HEAD_CHOICES",
    "HEAD_CLASSES",
    "MODEL_INPUTS",
    "Batch",
    "CausalGenerationHead",
    "CausalPromptHead",
    "ClassificationHead",
    "HeadError",
    "LossHead",
    "MaskedLMPromptHead",
    "SequenceClassificationHead",
    "build_head",
    "count_at_length",
    "evaluate",
    "get_head",
    "model_inputs",
    "move_batch",
    "resolve_head",
]
