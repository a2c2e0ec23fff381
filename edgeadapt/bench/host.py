"""Facts about the machine a run measured on: the CPU, the GPU, the process's resident memory."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path


def rss_bytes() -> int:
    """The process's resident set size in bytes (psutil)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the visible core count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible"


def gpu_name() -> str | None:
    """The GPU's name (torch, else nvidia-smi), or None where neither can tell."""
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001 - a GPU name is informational only
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None
