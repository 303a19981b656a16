"""Triton kernels of dpzo-engine, installed under the import name ``dpzo_triton``.

(A package named ``kernels`` exists on PyPI and transformers probes for it, so this
directory is mapped to a project-specific name by setup.py.)
"""
