"""What machine a timed run ran on, for reports whose budget is CPU time."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def describe_machine() -> dict[str, Any]:
    """The CPU that timed a run: its name, logical cores, the vector ISA torch's kernels use
    (``AVX2``, ``AVX512``, ...) and the torch version. The same CPU-minute budget bought 6,300
    training steps on one machine and 3,400 on another (docs/research/fidelity.md), so reports carry this."""
    name = platform.processor() or platform.machine()
    try:  # Linux: the marketing name; platform.processor() is often just the architecture there
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        name = names[0] if names else name
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "isa": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def machine_line(machine: dict[str, Any]) -> str:
    """``describe_machine()`` as one line of a report."""
    return (f"{machine['cpu']}, {machine['cores']} logical cores, torch {machine['torch']} "
            f"({machine['isa']} kernels)")
