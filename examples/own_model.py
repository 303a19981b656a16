"""Your own PyTorch model, loss and data, trained with DP-AggZO through the Python API.

    python examples/own_model.py [--steps 300] [--epsilon 2]

The data here are made up so the script needs nothing but the package: points in 20 dimensions
whose class is the sign of a fixed random projection (plus 5% of flipped labels). Put your own
tensors in their place. The loop in the middle is all the engine needs: a batch of indices from
the secret Poisson sampler, and a function returning one loss per example.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import dpzo_engine


def make_data(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g)
    x = torch.randn(n, dim, generator=g)
    y = (x @ w > 0).long()
    flip = torch.rand(n, generator=g) < 0.05
    return x, torch.where(flip, 1 - y, y)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--epsilon", type=float, default=2.0)
    p.add_argument("--examples", type=int, default=4000)
    args = p.parse_args()

    torch.manual_seed(0)
    x, y = make_data(args.examples + 1000, 20, seed=1)
    x, y, x_test, y_test = x[:-1000], y[:-1000], x[-1000:], y[-1000:]  # 1,000 held-out points
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 2))
    print(f"test accuracy before: {accuracy(model, x_test, y_test):.3f}")

    zo = dpzo_engine.PrivateZO.make(
        model,  # every parameter with requires_grad=True trains
        num_examples=len(x),
        steps=args.steps,
        batch_size=256,  # expected size of the Poisson batches
        epsilon=args.epsilon,
        delta=1e-5,
        num_directions=16,  # K directions per step, clipped jointly per example
        clip=1.0,
        lr=0.2,
    )

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xb), yb, reduction="none")  # one loss per example, not the mean

    for idx in zo.batches():  # indices drawn from the secret generator; some batches are empty
        record = zo.step(loss, x[idx], y[idx])  # 2K forwards, clip, noise, one fused update
        if zo.steps_done % 100 == 0 and record.loss is not None:  # loss: None for an empty batch
            print(f"step {zo.steps_done}: loss {record.loss:.4f}, epsilon {zo.epsilon():.3f}")

    print(f"test accuracy after: {accuracy(model, x_test, y_test):.3f}")
    print(f"epsilon spent: {zo.epsilon():.3f} (delta 1e-5)")
    print(zo)


if __name__ == "__main__":
    main()
