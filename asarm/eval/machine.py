"""What a result ran on: host, CPU, Python, torch, threads, GPU (every results.json records it)."""

from __future__ import annotations

import os
import platform
import socket
import sys
from typing import Any

import torch

from ..resources import available_cpus

__all__ = ["machine_info"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu": _cpu_name(),
            "python": sys.version.split()[0],
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "available_cpus": available_cpus(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
