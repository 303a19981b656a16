"""Test set-up: CPU by default; Triton kernels run under TRITON_INTERPRET=1 without CUDA.

The interpreter flag is read when a ``triton.jit`` function is created, so it is set
here, before any test module imports ``dpzo_triton``.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
