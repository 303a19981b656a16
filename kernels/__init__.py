"""Triton kernels of dpzo-engine, installed under the import name ``dpzo_triton``.

(A package named ``kernels`` exists on PyPI and transformers probes for it, so this
directory is mapped to a project-specific name by setup.py.)

One op per module, each a @triton.jit kernel plus a small Python wrapper:
``stream`` (Philox / Box-Muller / Rademacher / rounding-bit helpers), ``directions``,
``apply_directions`` and ``clip_aggregate``.  Nothing is imported here: Triton reads
``TRITON_INTERPRET`` when a jit function is created, so the modules load on first use
(``dpzo_engine.ops.triton_backend``).
"""
