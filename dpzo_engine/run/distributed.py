"""Launching a run on torch.distributed ranks, and what only rank 0 may do.

    torchrun --nproc-per-node N -m dpzo_engine.train ... --parallel data|directions|2d [--direction-ranks R]

``start`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
checks the layout, joins the process group (gloo on CPU, NCCL on GPU, every collective bounded
by ``--collective-timeout``), pins the local rank's GPU and checks that every rank runs on the
same kind of device. A plain ``python -m dpzo_engine.train`` is the 1-rank case: no process
group, and the step's collectives return their input (``zo.parallel``).

Errors: a layout or set-up error that every rank meets the same way is printed once, by rank 0,
and every rank exits 2 (``agree`` exchanges set-up failures so that no rank waits on one that gave
up). A dead or stuck rank ends the job: the survivors' next collective fails or times out
(``ParallelFault``, exit 1), and torchrun stops the rest.

Rank 0 alone holds the secret generator and writes the output directory; the other ranks get a
``ReplicaRun``, whose writes do nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..core.errors import TrainingDiverged, UserError, report
from ..core.interrupts import Interrupted
from ..zo.parallel import CollectiveFailed, Comm, Layout, LayoutError, ParallelFault
from .config import FIRST_ORDER_METHODS, TrainConfig

T = TypeVar("T")
DEVICE_KINDS = ("cpu", "cuda")
MESSAGE_BYTES = 1024  # an agreed set-up error travels as this many UTF-8 bytes


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError:
        raise LayoutError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None


def start(cfg: TrainConfig) -> Comm:
    """This rank's ``Comm``: the layout checked, the process group joined (world size > 1 only)."""
    rank, world, local_rank = env_rank()
    layout = Layout.make(cfg.parallel, world, rank, cfg.num_directions, cfg.direction_ranks)
    if world == 1:
        return Comm(layout)
    if cfg.method in FIRST_ORDER_METHODS:
        raise LayoutError(f"--method {cfg.method} runs on one rank; launch it without torchrun")
    if cfg.steps == 0:
        raise LayoutError("--steps 0 (evaluation only) runs on one rank; launch it without torchrun")
    device = _local_device(cfg.device, local_rank)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.collective_timeout)
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    comm = Comm(layout, device)
    agree(comm, lambda: check_devices(comm, device.type))
    return comm


def _local_device(name: str, local_rank: int) -> torch.device:
    """``--device cuda`` (or auto with CUDA) is the local rank's GPU: one process per device."""
    wants_cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return torch.device("cpu")
    if ":" in name:
        raise LayoutError(f"--device {name}: under torchrun each rank takes its local rank's GPU; give --device cuda")
    if not torch.cuda.is_available():
        raise LayoutError("--device cuda asked for, but CUDA is not available on this rank")
    if local_rank >= torch.cuda.device_count():
        raise LayoutError(
            f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            "launch at most that many processes per node"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def check_devices(comm: Comm, kind: str) -> None:
    """Every rank must run on the same kind of device (the step's tensors and rounding must match)."""
    code = torch.tensor([DEVICE_KINDS.index(kind) if kind in DEVICE_KINDS else len(DEVICE_KINDS)])
    kinds = [int(k) for k in gather_cpu(code)]
    if len(set(kinds)) > 1:
        names = [DEVICE_KINDS[k] if k < len(DEVICE_KINDS) else "other" for k in kinds]
        listing = ", ".join(f"rank {r}: {n}" for r, n in enumerate(names))
        raise LayoutError(f"the ranks run on different kinds of device ({listing}); give every rank the same --device")


def gather_cpu(value: torch.Tensor) -> list[torch.Tensor]:
    """all_gather of a small CPU tensor (gloo carries CPU tensors in either process group)."""
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value)
    return parts


def agree(comm: Comm, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raised a ``UserError`` on any rank, raise that error on every
    rank (the lowest failing rank's message), so no rank goes on to wait for one that gave up."""
    if comm.world_size == 1:
        return fn()
    failure: UserError | None = None
    result = None
    try:
        result = fn()
    except UserError as exc:
        failure = exc
    except OSError as exc:  # a file rank 0 could not read or write: one line, the file and the cause
        failure = UserError(f"{exc.filename or 'the output directory'}: {exc.strerror or exc}")
    message = torch.zeros(MESSAGE_BYTES + 1, dtype=torch.uint8)
    if failure is not None:
        text = (str(failure).strip().splitlines() or [type(failure).__name__])[0].encode()[:MESSAGE_BYTES]
        message[0] = 1 + int(getattr(failure, "exit_code", 2) != 2)
        message[1 : 1 + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    try:
        messages = gather_cpu(message)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        lost = CollectiveFailed(f"rank {comm.layout.rank}, set-up: exchanging set-up errors failed (did another "
                                f"rank die?): {first}")  # fmt: skip
        raise failure or lost from None
    for rank, m in enumerate(messages):
        if int(m[0]):
            if failure is not None:
                failure.agreed = True  # every rank stops here (``ends_together``)
                raise failure
            text = bytes(m[1:].tolist()).rstrip(b"\0").decode(errors="replace")
            raise AgreedError(text if rank == 0 else f"rank {rank}: {text}", 2 if int(m[0]) == 1 else 1)
    return result


class AgreedError(UserError):
    """Another rank's set-up error, raised here too so that every rank stops the same way."""

    agreed = True

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def from_root(comm: Comm, value: T | None) -> T:
    """Rank 0's ``value`` (a small picklable object) on every rank."""
    if comm.world_size == 1:
        return value
    box = [value if comm.is_root else None]
    dist.broadcast_object_list(box, src=0, device=comm.device if comm.device.type == "cuda" else None)
    return box[0]


def report_error(exc: UserError, comm: Comm | None) -> int:
    """One ``error:`` line from rank 0 for errors every rank meets the same way (layout, set-up, diverged
    replicas), one from each rank for its own failed collective; the exit code (2: input, 1: fault)."""
    code = getattr(exc, "exit_code", 2)
    rank = comm.layout.rank if comm is not None else _rank_or_zero()
    if rank == 0 or getattr(exc, "every_rank", False):
        return report(exc, code)
    return code


def _rank_or_zero() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def ends_together(exc: BaseException) -> bool:
    """Whether every rank stops at this same point with ``exc``: a stop signal agreed at a step
    boundary, an error exchanged by ``agree``, a replica mismatch (every rank compares the same
    checksums), a divergence (θ is the same everywhere). Not a failed collective (a peer is gone)."""
    if isinstance(exc, CollectiveFailed):
        return False
    return isinstance(exc, Interrupted | ParallelFault | TrainingDiverged) or getattr(exc, "agreed", False)


def finish(comm: Comm | None, together: bool = False) -> None:
    """Leave the process group (after the last collective). ``together``: every rank is on its way
    out at the same point (the job ended, or an error every rank met), so they first wait for each
    other (rank 0 may still be writing the model): a rank that tears its connections down while a
    peer still holds them can abort in gloo's threads ("terminate called without an active
    exception") and turn a clean exit into SIGABRT. Otherwise (a peer died) nobody waits."""
    if comm is None or comm.world_size == 1 or not dist.is_initialized():
        return
    if together:
        with contextlib.suppress(RuntimeError):  # a peer that failed meanwhile: leave anyway
            dist.barrier()
    comm.close()
    dist.destroy_process_group()


class ReplicaRun:
    """The output directory as the ranks other than 0 see it: every write does nothing, and reading
    is refused (rank 0 reads and broadcasts what the replicas need)."""

    WRITES = (
        "save_secret", "start", "continue_from", "log_metrics", "log_ledger", "save_checkpoint", "save_model",
        "write_summary", "abandon", "release",
    )  # fmt: skip
    committed = False  # this process writes nothing

    def __init__(self, path):
        self.path = path

    def __getattr__(self, name: str):
        if name in self.WRITES:
            return lambda *args, **kwargs: None
        raise AttributeError(f"RunDir.{name} on rank {_rank_or_zero()}: only rank 0 touches the output directory")
