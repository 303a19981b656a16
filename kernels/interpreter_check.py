"""Whether this Triton's interpreter can run the kernels at all (``TRITON_INTERPRET=1`` only).

The kernels loop over runtime arguments (``for k0 in range(0, K, BK)``).  Triton 3.6's
interpreter turns such an argument into a Python int with ``int()`` of a one-element numpy
array, which numpy 2.4 no longer allows, so every kernel would stop with a TypeError deep
inside the interpreter.  Triton 3.9 squeezes the array first.  One tiny interpreted kernel
tells which case this is, so the backend can refuse with one line instead.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _count_to(out_ptr, n):
    count = 0
    for _ in range(0, n, 1):
        count += 1
    tl.store(out_ptr, count)


def runtime_loop_problem() -> str | None:
    """None if a loop over a runtime argument runs (and counts right) here, else what went wrong."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_to[(1,)](out, 3)
    except Exception as exc:  # the interpreter wraps the TypeError in its own InterpreterError
        return f"{type(exc).__name__}: {exc}"
    return None if int(out.item()) == 3 else f"a 3-iteration loop counted {int(out.item())}"
