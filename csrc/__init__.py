"""C++ sources of the CPU kernels, installed as ``dpzo_csrc`` so they can be JIT-built
(``torch.utils.cpp_extension.load`` with ninja) from an installed package too."""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
