"""What travels with the saved model: its label names, its prompt, and its privacy guarantee.

``label_model_config`` puts the task's ``id2label`` / ``label2id`` (and, for prompt heads, the
template and label words) into the model's config before ``save_pretrained``, so the model
predicts "positive" rather than ``LABEL_1``. ``write_model_card`` writes ``privacy.json``
(``privacy.privacy_record``) and a model card (``README.md`` with Hugging Face front matter) that
states the guarantee in words, next to the weights it covers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import TaskData
from .config import TrainConfig

CARD_NOTE = "Written by dpzo-engine; privacy.json next to this card holds the same facts in machine-readable form."


def label_model_config(config, task: TaskData, head) -> None:
    """The task's label names (classification) and the prompt a prompt head scores with."""
    if not task.is_generation:
        config.id2label = {i: name for i, name in enumerate(task.label_names)}
        config.label2id = {name: i for i, name in enumerate(task.label_names)}
    prompt = _prompt(head)
    if prompt is not None:
        config.dpzo_prompt = prompt


def _prompt(head) -> dict | None:
    """Template and label words of a prompt head (None for a plain classifier)."""
    if getattr(head, "prompt", None) is not None and head.name == "mlm-prompt":
        return {"head": head.name, "template": head.prompt.template, "label_words": list(head.prompt.label_words)}
    if head.name == "causal-prompt":
        return {"head": head.name, "template": head.template, "label_words": list(head.words)}
    if head.name == "causal-generation":
        return {"head": head.name, "template": head.template + head.stop}
    return None


def write_model_card(
    model_dir: Path,
    cfg: TrainConfig,
    task: TaskData,
    head,
    record: dict,
    final_scores: dict,
    adapter: dict | None = None,
) -> None:
    """``adapter``: the PEFT adapter's facts (``Adapter.describe``) when ``model_dir`` holds an adapter."""
    model_dir = Path(model_dir)
    (model_dir / "privacy.json").write_text(json.dumps(record, indent=2) + "\n")
    (model_dir / "README.md").write_text(_card(cfg, task, head, record, final_scores, adapter))


def _card(cfg: TrainConfig, task: TaskData, head, record: dict, scores: dict, adapter: dict | None = None) -> str:
    tags = ["dpzo-engine", cfg.method, "zeroth-order" if cfg.method not in ("dp-adamw", "adamw") else "first-order"]
    if record["private"]:
        tags.append("differential-privacy")
    if adapter is not None:
        tags.append(adapter["kind"])
    library = "peft" if adapter is not None else "transformers"
    front = ["---", f"library_name: {library}", f"pipeline_tag: {_pipeline(task)}", "tags:"]
    front += [f"- {t}" for t in tags]
    if "/" in cfg.model and not Path(cfg.model).exists():
        front.append(f"base_model: {cfg.model}")
    front.append("---")
    base = Path(cfg.model).name if Path(cfg.model).exists() else cfg.model  # a local directory: its name only
    lines = [*front, "", f"# {base} fine-tuned on {task.name} with {cfg.method}", ""]
    lines += _guarantee(record)
    lines += ["", "## Training", ""]
    lines += _table(
        [
            ("method", cfg.method),
            ("loss head", head.name),
            ("trainable parameters", cfg.trainable),
            ("steps T (releases)", record["steps"]),
            ("directions K", record.get("num_directions", "-")),
            ("clip C", record.get("clip", "-")),
            ("noise multiplier sigma", f"{record['noise_multiplier']:.6g}"),
            ("sampling rate q", f"{record['sample_rate']:.6g} ({record['sample_rate_source']})"),
            ("dataset size n", record["dataset_size"] if record["dataset_size_public"] else "private"),
            ("released count", record["released_count"] if record["released_count"] is not None else "-"),
            ("ledger sha256", f"`{record['ledger_sha256']}`"),
        ]
    )
    if adapter is not None:
        lines += ["", "## Adapter", ""]
        lines += [f"A PEFT {adapter['kind']} adapter; the base model's own weights are unchanged. Load the base model"]
        lines += [f"({cfg.model}, with these labels), then `peft.PeftModel.from_pretrained(base, <this directory>)`."]
        lines += ["", *_table([(k, v) for k, v in adapter.items() if k != "kind"])]
    prompt = _prompt(head)
    lines += ["", "## Labels", ""]
    if task.is_generation:
        lines.append("A generation task: answers are decoded greedily.")
    else:
        lines.append(", ".join(f"{i}: `{name}`" for i, name in enumerate(task.label_names)))
    if prompt is not None:
        lines += ["", f"Prompt ({prompt['head']}): `{json.dumps(prompt['template'])[1:-1]}`"]
        if "label_words" in prompt:
            lines.append("Label words: " + ", ".join(f"`{w}`" for w in prompt["label_words"]))
    metric = head.primary_metric
    if metric in scores:
        lines += ["", "## Evaluation", "", f"Test {metric}: {scores[metric]:.4f} on {task.name}'s test split."]
        lines.append("The evaluation data are not covered by the privacy guarantee.")
    lines += ["", "## Reproduce the weights from the ledger", ""]
    lines += ["`python -m dpzo_engine.replay RUN_DIR --verify` rebuilds these weights from the base model and the"]
    lines += ["run's ledger.jsonl alone (public seeds and released coefficients; no data)."]
    lines += ["", f"_{CARD_NOTE}_", ""]
    return "\n".join(lines)


def _guarantee(record: dict) -> list[str]:
    if not record["private"]:
        return ["## Privacy", "", f"**Not private**: {record['privacy'].removeprefix('not private: ')}.", ""]
    acc = record["accountant"]
    lines = [
        "## Privacy guarantee",
        "",
        f"**(epsilon, delta) = ({record['epsilon']:.4g}, {record['delta']:g})-differential privacy** for "
        f"{record['unit_of_privacy']}.",
        "",
        f"Accountant: {acc['name']} upper bound (lower {acc['epsilon_lower']:.4g}, estimate "
        f"{acc['epsilon_estimate']:.4g}; RDP cross-check {acc['epsilon_rdp']:.4g}). Target epsilon "
        f"{record['epsilon_target']}.",
        "",
        "Covered: " + "; ".join(record["covered"]) + ".",
        "",
        "Not covered:",
        "",
    ]
    lines += [f"- {item}" for item in record["not_covered"]]
    return lines


def _table(rows: list[tuple[str, object]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _pipeline(task: TaskData) -> str:
    return "text-generation" if task.is_generation else "text-classification"
