"""What the memory and step-time benchmarks share: models, the papers' batch settings, losses, naming.

Models are built from their configs with random weights directly on the device (no download):
compute and memory do not depend on the weights' values. Batches are random token ids with
every example at the full length of its setting (the worst case of a padded batch).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpzo_engine.models.inputs import static_inputs
from dpzo_engine.models.loading import build_random_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 1 << 30

# name -> (architecture, size in dpzo_engine.models.loading.SIZES); the last three are for smoke runs only
MODELS = {
    "opt-125m": ("opt", "125m"),
    "opt-350m": ("opt", "350m"),
    "opt-1.3b": ("opt", "1.3b"),
    "opt-2.7b": ("opt", "2.7b"),
    "opt-6.7b": ("opt", "6.7b"),
    "roberta-large": ("roberta", "large"),
    "roberta-mini": ("roberta", "mini"),
    "opt-small": ("opt", "small"),
    "opt-tiny": ("opt", "tiny"),
    "roberta-tiny": ("roberta", "tiny"),
}


@dataclass(frozen=True)
class Setting:
    """One training batch of a paper's setting: the head, examples per (expected) batch, tokens each."""

    name: str
    head: str  # "sequence-classification" or "causal-generation"
    batch: int
    length: int
    source: str
    answer_tokens: int = 0  # causal-generation: trailing tokens that are the answer (teacher forced)


SETTINGS = {
    ("sst2", "opt"): Setting(
        "sst2", "sequence-classification", 64, 64,
        "DP-AggZO OPT SST-2: Poisson q = 0.064 of 1000 examples (expected batch 64); every example padded to "
        "64 tokens (SST-2 sentence + prompt; a batch is padded to its longest)",
    ),
    ("sst2", "roberta"): Setting(
        "sst2", "sequence-classification", 64, 128,
        "DP-AggZO / MeZO RoBERTa-large SST-2: expected batch 64 (q = 0.0625 of 1024), LM-BFF max length 128",
    ),
    ("squad", "opt"): Setting(
        "squad", "causal-generation", 64, 384,
        "DP-AggZO OPT SQuAD: q = 0.064 of 1000 examples (expected batch 64); 384 tokens per example (assumed padded "
        "length of title + context + question + answer prompts), loss on the last 8 (answer) tokens",
        answer_tokens=8,
    ),
}  # fmt: skip


def setting_for(name: str, model: str) -> Setting | None:
    """The setting for ``model`` (None: the papers do not run that task on that model)."""
    return SETTINGS.get((name, MODELS[model][0]))


# ----------------------------------------------------------------------------- models and batches


def build_model(model: str, head: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """Random-init model for ``head`` (sequence-classification, causal-generation, causal-prompt,
    mlm-prompt), in eval mode, built directly on ``device``."""
    arch, size = MODELS[model]
    return build_random_model(arch, size, num_labels=2, dtype=dtype, device=device, seed=seed, head=head)


def full_length_batch(model: nn.Module, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids, every example ``length`` tokens (no padding), random binary labels, on the model's device."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    device = next(model.parameters()).device
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch,), generator=g).to(device),
    }


# ----------------------------------------------------------------------------- losses


class AnswerNLL:
    """Teacher-forced answer NLL (SQuAD setting): the last ``answer_tokens`` tokens of each example
    are its answer; per-example mean NLL over them. Hidden states are gathered at the positions that
    predict them before the LM head module runs, so full-vocabulary logits exist there only (as in
    the engine's causal-generation head). The LM head is called as a module, so Opacus sees it."""

    def __init__(self, answer_tokens: int):
        self.answer_tokens = answer_tokens

    def per_example_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        t, a = ids.shape[1], self.answer_tokens
        hidden = model.base_model(input_ids=ids, attention_mask=batch["attention_mask"])[0]
        logits = model.get_output_embeddings()(hidden[:, t - a - 1 : t - 1]).float()  # [B, A, V]
        return F.cross_entropy(logits.transpose(1, 2), ids[:, t - a :], reduction="none").mean(dim=1)


class LabelWordLoss:
    """Prompt classification by label words (SST-2, "… It was great / terrible"): cross-entropy over
    the label words' logits at one position (the last token for a causal LM, the mask for RoBERTa),
    computed in one of three forms that give the same per-example losses:

    * ``ours``: the engine's heads. The base model's hidden state at that position only, then only the
      label words' rows of the LM head; the batch's mask and positions prepared once (``prepare``), and
      in a step the last block computed at that position only (``read_positions``).
    * ``published``: what the published ZO code computes. For a masked LM, LM-BFF's prompt model (MeZO's
      ``medium_models``, the DP-AggZO RoBERTa code): the hidden state at the mask through the whole MLM
      head, logits over the full vocabulary there. For a causal LM, MeZO's ``large_models``: the model's
      full [B, T, V] logits and a log-softmax over the vocabulary at every position.
    * ``plain``: ``model(**batch)`` with its full [B, T, V] logits, then the label words at the position.

    The log-softmax normaliser is common to the label words, so all forms give the same losses.
    """

    FORMS = ("ours", "published", "plain")

    def __init__(self, masked_lm: bool, label_ids: tuple[int, ...], form: str):
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}")
        self.masked_lm = masked_lm
        self.label_ids = label_ids
        self.form = form

    def position(self, ids: torch.Tensor) -> int:
        return ids.shape[1] - 2 if self.masked_lm else ids.shape[1] - 1  # RoBERTa: the token before </s>

    def read_positions(self, batch: dict) -> torch.Tensor | None:
        """Ours: the one position the loss reads, so that the last block runs there only."""
        ids = batch["input_ids"]
        if self.form != "ours":
            return None
        return torch.full((ids.shape[0], 1), self.position(ids), dtype=torch.long, device=ids.device)

    def prepare(self, model: nn.Module, batch: dict) -> dict:
        """What all forwards of a step share, built once (ours only: the published code rebuilds it per call)."""
        return static_inputs(model, batch) if self.form == "ours" else batch

    def per_example_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        from dpzo_engine.heads.lm import final_hidden, mlm_transform, output_embedding, vocab_logits

        ids = batch["input_ids"]
        pos = self.position(ids)
        label_ids = torch.tensor(self.label_ids, device=ids.device)
        if self.form == "ours":
            hidden = final_hidden(model, batch)[:, pos]
            if self.masked_lm:
                hidden = mlm_transform(model)(hidden)
            logits = vocab_logits(output_embedding(model), hidden, label_ids)
        elif self.form == "published" and self.masked_lm:
            hidden = model.base_model(input_ids=ids, attention_mask=batch["attention_mask"])[0][:, pos]
            lm_head = model.lm_head if hasattr(model, "lm_head") else model.cls  # RoBERTa / BERT MLM heads
            logits = lm_head(hidden).index_select(1, label_ids).float()  # [B, V] at the mask, then the words
        else:
            full = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits  # [B, T, V]
            if self.form == "published":
                full = full.float().log_softmax(dim=-1)
            logits = full[:, pos].index_select(1, label_ids).float()
        return F.cross_entropy(logits, batch["labels"], reduction="none")


def prompt_batch(model: nn.Module, batch: int, length: int, masked_lm: bool, seed: int = 0) -> dict:
    """A full-length batch; for a masked LM the scored position holds the mask token."""
    out = full_length_batch(model, batch, length, seed)
    if masked_lm:
        out["input_ids"][:, length - 2] = 3  # any fixed id: the cost does not depend on it
    return out


# ----------------------------------------------------------------------------- reporting


def print_targets(targets: list[dict], fmt: Callable[[Any], str]) -> None:
    """One line per target: [PASS] / [FAIL] / [n/a ] (not measurable on this device), the figure, the rule."""
    for t in targets:
        flag = "n/a " if t["pass"] is None else "PASS" if t["pass"] else "FAIL"
        print(f"  [{flag}] {t['name']}: {fmt(t['measured'])} ({t['rule']})")


# ----------------------------------------------------------------------------- naming


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def load_average() -> float | None:
    """The 1-minute load average (others share this machine: timings under load are noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """The GPU's name, or ``cpu-<model>``: goes into result file names."""
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return "cpu-" + slug(cpu_name())


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None
