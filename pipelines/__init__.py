"""Pipeline definitions (YAML) and the Ray job entry point (``python -m pipelines.ray_job``)."""
