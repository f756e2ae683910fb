"""The torch device a model runs on."""

from __future__ import annotations

import os

import torch

from ..errors import SpecsearchError


def choose_device(device: str = "auto") -> torch.device:
    """The torch device for "auto", "cpu" or "cuda"; "auto" is CUDA when available, else CPU.

    On CPU torch uses every core this process may use.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecsearchError("device 'cuda' requested but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SpecsearchError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores or 1))
    return torch.device(device)
