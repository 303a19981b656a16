"""Flat parameter buffer (docs/design.md section 3).

Trainable parameters are re-pointed as views into one contiguous buffer per dtype, so
a fused kernel can perturb or update every trainable weight in a single pass, and the
direction of a parameter is simply the slice of the global stream at its offset.

Order (documented, stable): ``model.named_parameters()`` order (module registration
order, the order of ``state_dict``), tied weights once under their first name, frozen
parameters (``requires_grad=False``) left out.  Buffers are ordered by the first
appearance of their dtype; the global stream index of buffer ``b``'s element ``i`` is
``buffer_offsets[b] + i``, where ``buffer_offsets`` are the running element counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSlot:
    """Where one trainable parameter lives: its buffer, its offset there and globally."""

    name: str
    buffer_index: int
    start: int  # element offset inside its buffer
    numel: int
    shape: tuple[int, ...]
    global_offset: int  # stream index of its first element


class FlatParams:
    """Trainable parameters of ``model`` as views of one contiguous buffer per dtype."""

    def __init__(self, model: nn.Module):
        groups: dict[torch.dtype, list[tuple[str, nn.Parameter]]] = {}
        for name, p in model.named_parameters():  # remove_duplicate=True: tied weights once
            if p.requires_grad:
                groups.setdefault(p.dtype, []).append((name, p))
        if not groups:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to fine-tune")
        devices = {p.device for members in groups.values() for _, p in members}
        if len(devices) != 1:
            raise ValueError(f"trainable parameters span several devices {sorted(map(str, devices))}")
        (device,) = devices

        self.buffers: list[torch.Tensor] = []
        self.buffer_offsets: list[int] = []
        self.slots: dict[str, ParamSlot] = {}
        global_offset = 0
        for b, (dtype, members) in enumerate(groups.items()):
            numel = sum(p.numel() for _, p in members)
            buf = torch.empty(numel, dtype=dtype, device=device)
            start = 0
            for name, p in members:
                n = p.numel()
                view = buf[start : start + n].view_as(p)
                view.copy_(p.detach())
                p.data = view  # the parameter now aliases the flat buffer
                self.slots[name] = ParamSlot(name, b, start, n, tuple(p.shape), global_offset + start)
                start += n
            self.buffers.append(buf)
            self.buffer_offsets.append(global_offset)
            global_offset += numel
        self.numel = global_offset
        self.device = device

    def offset_of(self, name: str) -> int:
        """Global stream index of the first element of parameter ``name``."""
        try:
            return self.slots[name].global_offset
        except KeyError:
            raise KeyError(f"{name!r} is not a trainable parameter in this buffer") from None

    def names(self) -> list[str]:
        return list(self.slots)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        """(buffer, global offset of its element 0) pairs, the unit the kernels work on."""
        return iter(zip(self.buffers, self.buffer_offsets))

    def clone_buffers(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.buffers]

    def load_buffers(self, values: list[torch.Tensor]) -> None:
        for buf, v in zip(self.buffers, values):
            buf.copy_(v)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def __repr__(self) -> str:
        parts = ", ".join(f"{b.dtype}:{b.numel()}" for b in self.buffers)
        return f"FlatParams({len(self.slots)} tensors, {self.numel} elements; {parts})"
