"""Tiny randomly initialised checkpoints in the exact on-disk formats of the real models.

``python -m datagen.tiny_weights OUT`` (``make tiny-weights``) builds all of them; the real
loaders of ``datagen.stages.models`` read them like real checkpoints.
"""
