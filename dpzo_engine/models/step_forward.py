"""The 2K forwards of a ZO step, made cheap: prepared once, padded to a bucket, compiled.

A step evaluates one batch 2K times (K + 1 with forward differences) at different θ. What does
not depend on θ is built once per step (``LossHead.prepare``: the attention mask, position ids;
``LossHead.read_positions``: where the loss reads the final hidden states, so that the last block
runs there only, ``models.last_block``), and the loss itself can run under ``torch.compile``, with
CUDA graphs on a GPU. Compiled code is
specialised to shapes, and Poisson batch sizes vary from step to step, so batches are padded to a
few bucket sizes (``batch_multiple``: the row count rounded up to a multiple) by repeating their
first example; the losses of the padded rows are cut off before anything sees them, so the
released values depend on the real examples only (rows are computed independently: tested).

``compile``: ``off`` (eager), ``on``, or ``auto`` (on for CUDA; off on the CPU, where an fp32
forward is matrix products at the core's peak, so compiling saves a few percent of each forward
and costs tens of seconds up front: see README, "Forwards").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .last_block import last_block_at

Batch = dict[str, Any]
LossOnBatch = Callable[[Batch], torch.Tensor]  # per-example losses [B] of a (prepared) batch
COMPILE_CHOICES = ("auto", "on", "off")
GPU_BATCH_MULTIPLE = 8  # bucket granularity with CUDA graphs: few recordings, at most 7 padded rows


def resolve_compile(mode: str, device: torch.device) -> bool:
    if mode not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}; got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def batch_rows(batch: Batch) -> int:
    """Examples in ``batch`` (its labels' length; every tensor's first dimension is the example)."""
    ref = batch["labels"] if "labels" in batch else batch["input_ids"]
    return int(ref.shape[0])


def bucket(rows: int, multiple: int) -> int:
    """``rows`` rounded up to a multiple of ``multiple`` (1: unchanged)."""
    return -(-rows // multiple) * multiple if multiple > 1 else rows


def pad_rows(batch: Batch, rows: int) -> Batch:
    """``batch`` grown to ``rows`` examples by repeating its first one (every per-example tensor)."""
    n = batch_rows(batch)
    if rows == n:
        return batch
    if rows < n:
        raise ValueError(f"cannot pad {n} rows down to {rows}")
    out: Batch = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
            index = torch.zeros(rows, dtype=torch.long, device=value.device)
            index[:n] = torch.arange(n, device=value.device)
            value = value.index_select(0, index)
        out[key] = value
    return out


@dataclass
class ForwardStats:
    """Where the forwards' time went that is not the forwards themselves (for the metrics and the README)."""

    forwards: int = 0
    padded_rows: int = 0  # rows computed and cut off, summed over forwards
    first_call_s: float = 0.0  # first forward of each new padded shape: compilation (and CUDA-graph recording)
    shapes: set[tuple] = field(default_factory=set)


class StepForward:
    """Turns a batch into the loss function of one step: ``step_forward.bind(batch)() -> [B]``.

    ``loss`` computes per-example losses of a batch (a head's ``per_example_loss`` on the model);
    ``prepare`` builds the batch's θ-independent tensors once per step (a head's ``prepare``);
    ``read_positions`` with ``model``: the positions the loss reads, for ``last_block_at``.
    """

    def __init__(
        self,
        loss: LossOnBatch,
        device: torch.device | str,
        compile: str = "auto",
        batch_multiple: int | None = None,
        prepare: Callable[[Batch], Batch] | None = None,
        cuda_graphs: bool | None = None,
        model: nn.Module | None = None,
        read_positions: Callable[[Batch], torch.Tensor | None] | None = None,
    ):
        device = torch.device(device)
        self.compiled = resolve_compile(compile, device)
        self.cuda_graphs = self.compiled and device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and (not self.compiled or device.type != "cuda"):
            raise ValueError("CUDA graphs need --compile on a CUDA device")
        if batch_multiple is None:
            batch_multiple = GPU_BATCH_MULTIPLE if self.cuda_graphs else 1
        if batch_multiple < 1:
            raise ValueError(f"batch_multiple must be >= 1; got {batch_multiple}")
        self.batch_multiple = batch_multiple
        self.prepare = prepare
        self.model, self.read_positions = model, read_positions
        self.stats = ForwardStats()
        self._loss = loss
        if self.compiled:
            # Symbolic batch and sequence sizes: one compilation serves every shape (CUDA graphs still record
            # once per shape, which is what the buckets keep few).
            mode = "reduce-overhead" if self.cuda_graphs else None
            self._run = torch.compile(loss, mode=mode, dynamic=True)
        else:
            self._run = loss

    def bind(self, batch: Batch) -> Callable[[], torch.Tensor]:
        """The step's loss function: per-example losses [B] of ``batch`` at the current θ."""
        prepared = self.prepare(batch) if self.prepare is not None else batch
        n = batch_rows(prepared)
        rows = bucket(n, self.batch_multiple)
        padded = pad_rows(prepared, rows)
        shape = tuple((k, tuple(v.shape)) for k, v in padded.items() if torch.is_tensor(v))
        positions = self.read_positions(padded) if self.read_positions is not None and self.model is not None else None
        stats = self.stats

        def losses() -> torch.Tensor:
            first = self.compiled and shape not in stats.shapes
            start = time.perf_counter() if first else 0.0
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer read
            with last_block_at(self.model, positions):  # positions None: the block runs whole
                out = self._run(padded)
            if rows != n or self.cuda_graphs:
                out = out[:n].clone()  # padded rows cut off; a CUDA-graph output is overwritten by the next replay
            if first:
                if out.is_cuda:
                    torch.cuda.synchronize(out.device)
                stats.first_call_s += time.perf_counter() - start
                stats.shapes.add(shape)
            stats.forwards += 1
            stats.padded_rows += rows - n
            return out

        return losses
