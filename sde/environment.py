"""What a run ran on: the device and its name, the precision, torch, the processes.

Every mode prints ``line(describe(...))`` when it starts and records ``describe(...)`` with
its outputs (``config.json`` and ``train_summary.json`` of a training run, the JSON record
of sample, eval, compare and align_steps), so a figure can be traced to its hardware.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, the CPU's model otherwise."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_model()


def describe(device: torch.device, *, processes: int = 1, dtype: torch.dtype = torch.float32,
             autocast: str = "none") -> dict[str, Any]:
    """The run's device (``cuda:0``, ``cpu``), its name, the parameters' dtype, the autocast
    precision (``none``, ``bf16``, ``fp16``), the torch version, the number of processes,
    and the CPU threads of each."""
    described = {"device": str(device), "device_name": device_name(device),
                 "dtype": str(dtype).replace("torch.", ""), "autocast": autocast, "torch": torch.__version__,
                 "processes": processes, "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    if device.type == "cuda":
        described["tf32"] = torch.backends.cuda.matmul.allow_tf32
    return described


def line(described: dict[str, Any]) -> str:
    """``describe``'s dict as the one line a mode prints at start."""
    autocast = "" if described["autocast"] == "none" else f", {described['autocast']} autocast"
    autocast += ", TF32" if described.get("tf32") else ""
    processes = described["processes"]
    return (f"device: {described['device']} ({described['device_name']}), {described['dtype']}{autocast}; "
            f"torch {described['torch']}; {processes} process{'es' if processes != 1 else ''}, "
            f"{described['threads']} thread{'s' if described['threads'] != 1 else ''} each")


def announce(device: torch.device, *, processes: int = 1, model: torch.nn.Module | None = None,
             autocast: str = "none", show: bool = True) -> dict[str, Any]:
    """``describe`` the run (the parameters' dtype from ``model``), print its line when
    ``show`` (rank 0), and return it for the mode's records."""
    parameter = next(model.parameters(), None) if model is not None else None
    described = describe(device, processes=processes, autocast=autocast,
                         dtype=parameter.dtype if parameter is not None else torch.float32)
    if show:
        print(line(described), flush=True)
    return described
