"""The torch device a model runs on."""

from __future__ import annotations

import os

import torch

from ..errors import SpecsearchError

_THREADS: int | None = None  # set_threads: the CPU threads torch may use (None: every core)


def set_threads(threads: int | None) -> None:
    """Let torch (and every later `choose_device`) use ``threads`` CPU threads; None or 0: every
    core. On a machine shared with other jobs one thread is often faster than two that wait
    for each other."""
    global _THREADS
    _THREADS = threads or None
    if _THREADS:
        torch.set_num_threads(_THREADS)


def choose_device(device: str = "auto") -> torch.device:
    """The torch device for "auto", "cpu" or "cuda"; "auto" is CUDA when available, else CPU.

    On CPU torch uses every core this process may use, or what `set_threads` said.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecsearchError("device 'cuda' requested but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SpecsearchError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(_THREADS or max(1, cores or 1))
    return torch.device(device)
