"""Where a benchmark ran: the machine and the versions of everything that ran it (nothing heavy imported)."""

from __future__ import annotations

import os
import platform


def machine() -> dict:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def versions() -> dict:
    """slimgpt_deploy.api.versions() plus the installed optional runtimes' and matplotlib's (nothing imported)."""
    from importlib.metadata import version

    from ..api import versions as base
    from ..extras import installed_versions

    return {**base(), **installed_versions(), "matplotlib": version("matplotlib")}
