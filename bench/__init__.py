"""Benchmarks and diagnostics of the model, outside the product: they use only the public functions
of ``datagen``, ``model`` and ``manifests``.

- ``python -m bench.fidelity``: the fidelity benchmark (train a recipe for a CPU budget, score the
  sampled layers against bars); ``--preset s3-120`` (default) is the regression benchmark.
- ``python -m bench.guidance MODEL_DIR``: self-mask guidance vs plain CFG on the benchmark's scenes.
- ``python -m bench.probe MODEL_DIR``: at which noise level a trained model settles a mask's shape.
- ``python -m bench.unet``: cost of the layered UNet against a plain one; sd15 sizes and FLOPs.
- ``bench/gpu_fidelity.sh``: benchmark recipes trained and scored on a lent GPU machine.

Results and how to read them: BENCHMARKS.md; what was tried to reach the bars: docs/research/.
"""
