"""Choosing the device once per process."""

from __future__ import annotations

import os

import torch

from models import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` -> the GPU of this worker (LOCAL_RANK, SLURM_LOCALID, else the first visible one) or the CPU;
    `cpu`, `cuda`, `cuda:N` as given (a CUDA device on a machine without one is a user error)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        for var in ("LOCAL_RANK", "SLURM_LOCALID"):
            if os.environ.get(var, "").isdigit():
                return _cuda(int(os.environ[var]) % torch.cuda.device_count())
        return _cuda(0)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' requested but CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        return _cuda(index)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")


def _cuda(index: int) -> torch.device:
    # Fixed input shapes per stage, so cuDNN's autotuner pays for itself after the first batches.
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", index)


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model once to `device`; channels_last on CUDA to match the data layout."""
    if device.type == "cuda":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)
