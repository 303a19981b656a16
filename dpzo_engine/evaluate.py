"""``python -m dpzo_engine.evaluate``: score a model on a task's test split, without training.

It takes the trainer's flags (``--model``, ``--task``, the data and head flags, ``--max-length``,
``--eval-batch-size``, ``--max-eval-examples``), so a fine-tuned ``RUN/model`` directory can be
scored on the data it was trained for, or a base model's zero-shot prompt on yours:

    python -m dpzo_engine.evaluate --model runs/default/model
    python -m dpzo_engine.evaluate --model runs/lora/model        # a --peft run's adapter, on its base model
    python -m dpzo_engine.evaluate --model smollm2 --task local --train-file reviews.csv \
        --template "{text} It was {mask}." --label-words "negative=terrible,positive=great"

``python -m dpzo_engine.train --steps 0`` does the same. Nothing is written and no privacy is
spent (the test split is only read); the metrics are printed, the last line as JSON.
"""

from __future__ import annotations

import json
import sys

import torch

from .core.errors import ConfigError, UserError, report
from .heads import build_head, evaluate, resolve_head
from .models.adapters import adapter_base_model, is_adapter_dir, load_saved_adapter
from .models.loading import ModelError, load_model_and_tokenizer, model_kind
from .run.config import TrainConfig, parse_args
from .run.session import load_task, resolve_device


def evaluate_only(cfg: TrainConfig) -> dict:
    """The test metrics of ``cfg.model`` on ``cfg.task`` (a fresh head is initialised from ``cfg.seed``).
    ``cfg.model`` may be a ``--peft`` run's adapter directory: its base model is loaded, then the adapter."""
    task = load_task(cfg)
    adapter = cfg.model if is_adapter_dir(cfg.model) else None
    base = adapter_base_model(adapter) if adapter else cfg.model
    try:
        head_name = resolve_head(cfg.head, task, model_kind(base))
        torch.manual_seed(cfg.seed)  # a head the checkpoint lacks starts as a training run's would
        model, tokenizer = load_model_and_tokenizer(
            base, task.num_labels, dtype=getattr(torch, cfg.dtype), device=resolve_device(cfg.device), head=head_name
        )
    except ModelError as exc:
        raise (ModelError(f"{adapter} is a PEFT adapter on {base}: {exc}") if adapter else exc) from None
    if adapter:
        model = load_saved_adapter(model, adapter)
    model.eval()
    extra = {"max_new_tokens": cfg.max_new_tokens} if head_name == "causal-generation" else {}
    head = build_head(head_name, task, **extra)
    examples = task.test if cfg.max_eval_examples is None else task.test[: cfg.max_eval_examples]
    max_length = cfg.max_length or task.max_length
    metrics = evaluate(model, head, examples, tokenizer, cfg.eval_batch_size, max_length)
    return {
        "model": cfg.model,
        "task": task.name,
        "head": head_name,
        "split": "test",
        "metric": head.primary_metric,
        **metrics,
    }


def print_metrics(result: dict) -> None:
    metric = result["metric"]
    others = ", ".join(f"{k} {result[k]:.4f}" for k in ("loss", "f1", "exact_match") if k in result and k != metric)
    print(
        f"evaluation only (no training, no privacy spent): {result['model']} on {result['task']} ({result['head']})\n"
        f"test {metric.replace('_', ' ')}: {result[metric]:.4f} ({others}; {result['n']} examples)"
    )
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if any(a == "--steps" or a.startswith("--steps=") for a in args):
            raise ConfigError("python -m dpzo_engine.evaluate trains nothing: drop --steps")
        cfg = parse_args([*args, "--steps", "0"], prog="python -m dpzo_engine.evaluate")
        result = evaluate_only(cfg)
    except UserError as exc:
        return report(exc)
    print_metrics(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
