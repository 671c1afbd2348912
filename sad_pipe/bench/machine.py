"""What the figures were measured on: a ratio means little without the machine and its load."""

from __future__ import annotations

import os
import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def available_memory_bytes() -> int | None:
    """MemAvailable (Linux): what a benchmark may allocate before the machine swaps or kills it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> float | None:
    """1-minute load average; above the core count means the timings were taken on a busy machine."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def describe(device: str) -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "cpu": _cpu_model(), "cores": cores, "memory_gib": _memory_gib(),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "device": device, "gpu": None, "cuda": None, "load_average_start": load_average(),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        out["cuda"] = torch.version.cuda
    return out


def summary_line(machine: dict) -> str:
    gpu = f", GPU {machine['gpu']} (CUDA {machine['cuda']})" if machine.get("gpu") else ""
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM{gpu}; "
            f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}")
