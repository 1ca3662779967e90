"""LayerDiff dataset construction: raw images to layered WebDataset shards."""

__version__ = "0.1.0"
