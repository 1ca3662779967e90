"""The one registry of stage backends: (stage, backend name) -> Stage class."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datagen.stages.base import Stage

STAGES = ("decode", "caption", "ground", "segment", "inpaint", "assemble")

_REGISTRY: dict[tuple[str, str], type[Stage]] = {}

# Modules that register backends when imported. Model backends import their heavy
# libraries lazily, inside __init__, so listing them here costs nothing.
_BACKEND_MODULES = (
    "datagen.stages.decode",
    "datagen.stages.classical",
    "datagen.stages.matting",
    "datagen.stages.assemble",
    "datagen.stages.truth",
    "datagen.stages.models",
)


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: register ``cls`` under ``(cls.stage, cls.name)``."""
    if cls.stage not in STAGES:
        raise ValueError(f"{cls.__name__}: unknown stage {cls.stage!r}; stages are {STAGES}")
    key = (cls.stage, cls.name)
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"backend {cls.stage}/{cls.name} registered twice")
    _REGISTRY[key] = cls
    return cls


def _load_all() -> None:
    for module in _BACKEND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency, not an absent module
                raise


def get_backend(stage: str, name: str) -> type[Stage]:
    """The Stage class registered for ``stage`` under ``name``; KeyError lists the choices."""
    _load_all()
    try:
        return _REGISTRY[(stage, name)]
    except KeyError:
        choices = sorted(n for s, n in _REGISTRY if s == stage)
        raise KeyError(f"unknown backend {name!r} for stage {stage!r}; choose one of {choices}") from None


def backends() -> dict[str, list[str]]:
    """Registered backend names by stage."""
    _load_all()
    out: dict[str, list[str]] = {s: [] for s in STAGES}
    for stage, name in sorted(_REGISTRY):
        out[stage].append(name)
    return out
