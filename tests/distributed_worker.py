"""What the distributed tests run on each rank (a helper, not a test module).

    python tests/distributed_worker.py comm                  # RANK, WORLD_SIZE, MASTER_ADDR/PORT set
    torchrun ... tests/distributed_worker.py corrupt R S -- <train flags>

    python tests/distributed_worker.py slow SECONDS -- <train flags>

``comm`` checks the collectives of ``zo.parallel`` and ``run.distributed`` on a 2-rank gloo group
(exit 0 when every check holds). ``corrupt`` trains with ``python -m dpzo_engine.train``'s own
``main`` after flipping the sign bit of one of rank R's parameters at the end of step S (a
deliberately corrupted replica, which the replica check must catch). ``slow`` trains with ``main``
and sleeps SECONDS after each step, so that a test can signal or kill a rank between two steps of
a tiny model (which otherwise runs its steps in milliseconds).
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist


def expect_error(fn, cls, *needles: str) -> None:
    try:
        fn()
    except cls as exc:
        for needle in needles:
            assert needle in str(exc), f"{needle!r} not in {exc!r}"
        return
    raise AssertionError(f"{fn} did not raise {cls.__name__}")


def check_comm() -> None:
    from dpzo_engine.ops import ClipResult
    from dpzo_engine.run.distributed import agree, check_devices
    from dpzo_engine.zo.parallel import Comm, Layout, LayoutError, ParallelFault

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    directions = Comm(Layout.make("directions", 2, rank, num_directions=4))
    data = Comm(Layout.make("data", 2, rank, num_directions=4))

    # the batch: rank 0's indices, each data rank its contiguous share
    sampled = torch.tensor([3, 5, 8, 13, 21]) if rank == 0 else None
    assert directions.batch(sampled) == [3, 5, 8, 13, 21]
    assert data.batch(sampled) == ([3, 5, 8] if rank == 0 else [13, 21])

    # D: my two columns -> all four, in direction order; an empty data slice stays empty
    mine = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * rank
    full = directions.gather_directions(mine)
    expected = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(6.0).reshape(3, 2) + 10], dim=1)
    assert torch.equal(full, expected), full
    assert directions.gather_directions(torch.zeros(0, 2)).shape == (0, 4)

    # clipped sums over the data ranks, in fp64, counts included
    part = ClipResult(
        torch.full((4,), 1.5 + rank, dtype=torch.float64),
        torch.full((4,), 2.0, dtype=torch.float64),
        torch.tensor(rank),
        torch.tensor(1 - rank),
        3 + rank,
    )
    total = data.sum_over_data(part)
    assert torch.equal(total.sums, torch.full((4,), 4.0, dtype=torch.float64))
    assert (int(total.num_clipped), int(total.num_nonfinite), total.batch_size) == (1, 1, 7)

    # the release: rank 0's vector everywhere
    g = torch.tensor([0.25, -1.0], dtype=torch.float64)
    assert torch.equal(directions.from_root(g if rank == 0 else None, like=torch.zeros(2, dtype=torch.float64)), g)
    assert (directions.stats.calls, directions.stats.bytes) == (4, 8 + 5 * 8 + 2 * 3 * 2 * 4 + 2 * 8)

    # replica check: equal passes, one changed bit pattern stops every rank with the step named
    theta = [torch.linspace(-1, 1, 1001), torch.ones(7, dtype=torch.bfloat16)]
    directions.check_replicas(4, theta)
    if rank == 1:
        theta[0].view(torch.int32)[500] += 1
    expect_error(lambda: directions.check_replicas(6, theta), ParallelFault, "step 6", "rank(s) 1")

    # set-up errors are agreed: every rank raises the failing rank's message
    def fails_on_one():
        if rank == 1:
            raise LayoutError("only rank 1 saw this")
        return "ok"

    expect_error(
        lambda: agree(directions, fails_on_one), LayoutError if rank == 1 else Exception, "only rank 1 saw this"
    )
    assert agree(directions, lambda: rank) == rank
    kind = "cuda" if rank == 1 else "cpu"  # as if one node had a GPU and the other not
    expect_error(lambda: agree(directions, lambda: check_devices(directions, kind)), Exception, "rank 1: cuda")
    dist.destroy_process_group()


def corrupt_and_train(rank: int, step: int, argv: list[str]) -> int:
    from dpzo_engine.train import main
    from dpzo_engine.zo.step import ZOStep

    step_once = ZOStep.__call__

    def corrupted(self, t, loss_fn, forwards=None):
        record = step_once(self, t, loss_fn, forwards)
        if self.comm.layout.rank == rank and t + 1 == step:
            flat = self.engine.flat.buffers[0].view(-1)
            flat[flat.abs().argmax()].neg_()  # a flipped sign bit: no later pass can round it away
        return record

    ZOStep.__call__ = corrupted
    return main(argv)


def slow_train(seconds: float, argv: list[str]) -> int:
    from dpzo_engine.train import main
    from dpzo_engine.zo.step import ZOStep

    step_once = ZOStep.__call__

    def slowed(self, t, loss_fn, forwards=None):
        record = step_once(self, t, loss_fn, forwards)
        time.sleep(seconds)
        return record

    ZOStep.__call__ = slowed
    return main(argv)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "comm":
        check_comm()
        print(f"rank {os.environ['RANK']}: ok")
    elif what == "corrupt":
        sys.exit(corrupt_and_train(int(sys.argv[2]), int(sys.argv[3]), sys.argv[5:]))
    elif what == "slow":
        sys.exit(slow_train(float(sys.argv[2]), sys.argv[4:]))
    else:
        sys.exit(f"unknown check {what!r}")
