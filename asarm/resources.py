"""The device and the CPU threads a command runs on, and its progress bars.

``pick_device``: the device asked for, falling back to the CPU with one warning line when it does not
exist on this machine (as lm-eval's own Hugging Face model does), so ``--device cuda`` (lm-eval's default)
works on a machine without a GPU. ``available_cpus``: the CPUs this process may use (its affinity and the
cgroup's CPU quota); the default thread count is those that no other task is running on when the command
starts (``default_threads``); ``set_threads`` applies ``--threads``.
torch is imported inside the functions: the command line imports this module before it needs torch.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

__all__ = ["pick_device", "available_cpus", "competing_tasks", "default_threads", "set_threads", "load_average",
           "load_warning", "hide_library_progress_bars"]

_CGROUP = Path("/sys/fs/cgroup")


def _device_missing(device) -> str | None:
    """Why ``device`` (a torch.device) cannot be used here, or None."""
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available here" + ("" if torch.version.cuda else " (this torch is a CPU build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return "MPS is not available here"
    elif device.type not in ("cpu", "cuda", "mps", "meta"):
        return f"asarm runs on cpu, cuda or mps, not {device.type}"
    return None


def pick_device(device=None):
    """``device`` if given and present, else CUDA when available, else the CPU. A device that does not exist here
    falls back to the CPU with one warning line; a string that names no device is a one-line ValueError."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda, cuda:1 ... or leave it unset") from None
    missing = _device_missing(chosen)
    if missing is None:
        return chosen
    print(f"asarm: warning: device {device!r} requested but {missing}; using the CPU", file=sys.stderr)
    return torch.device("cpu")


def _cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), in CPUs, or None."""
    try:
        quota, period = (_CGROUP / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((_CGROUP / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((_CGROUP / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by the cgroup quota where there is one."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def competing_tasks(samples: int = 5, interval_s: float = 0.01) -> int:
    """Tasks (threads) running on the machine now besides the one reading, from ``/proc/loadavg``'s
    instantaneous runnable count (median of a few samples); 0 where it cannot be read or does not describe
    this process's CPUs (a cgroup quota or a narrower affinity: the count is then the host's)."""
    whole_machine = available_cpus() == (os.cpu_count() or 1) and _cgroup_cpu_limit() is None
    counts = []
    for i in range(samples if whole_machine else 0):
        try:
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, sorted(counts)[len(counts) // 2]) if counts else 0


def default_threads() -> int:
    """torch's intra-op threads when ``--threads`` is not given: the available CPUs (see available_cpus) that
    no other task is running on now, at least one. Spinning OpenMP threads on CPUs that other jobs hold slow
    a decode several times over (benchmarks/bench_threads.py); on an idle machine every CPU is used."""
    return max(1, available_cpus() - competing_tasks())


def set_threads(threads: int | None) -> int:
    """``--threads`` (None: :func:`default_threads`) as torch's intra-op threads; returns the count used."""
    import torch

    if threads is None:
        threads = default_threads()
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_warning(loads, cpus: int | None = None) -> str | None:
    """A warning when a load average in ``loads`` (taken at a run's start and end) exceeds the CPUs: then
    other jobs competed for them, and wall-clock times and their ratios are distorted. None otherwise."""
    cpus = cpus or available_cpus()
    peak = max((load for load in loads if load is not None), default=None)
    if peak is None or peak <= cpus + 0.5:
        return None
    return (f"the load average reached {peak:.1f} on {cpus} CPUs: other jobs competed for them, so wall-clock "
            f"times and their ratios are distorted; rerun on an idle machine (or with --threads 1)")


def hide_library_progress_bars() -> None:
    """``--no-progress`` for the libraries too: transformers' weight loading and saving, huggingface_hub's
    downloads and datasets' preparation print their own bars."""
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
