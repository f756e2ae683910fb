"""The embed stage as a Ray Data pipeline: the same chunks, the same chunk function, model actors.

A dataset of chunk descriptors flows through ``map_batches`` into a pool of actors, one per GPU
or CPU slot; each actor loads the model once and runs ``embed.embed_chunk`` on the chunks it is
given, so the rows written are those of the local engine. With ``address`` the pipeline joins an
existing Ray cluster (the store must then be on storage every node can reach).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import numpy as np

from ..errors import SpecsearchError
from .embed import Chunk, embed_chunk


class _EmbedActor:
    def __init__(self, store_root: str, model: str, device: str):
        from ..models.runner import SpecCLIPRunner

        self.store_root = store_root
        self.runner = SpecCLIPRunner(model, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts_by_kind: dict[str, list[int]] = {"lrs": [], "xp": [], "non_finite": [], "pid": []}
        for i in range(len(batch["start"])):
            chunk = Chunk(
                release=str(batch["release"][i]),
                shard_path=str(batch["shard_path"][i]),
                shard_sha256=str(batch["shard_sha256"][i]),
                start=int(batch["start"][i]),
                stop=int(batch["stop"][i]),
            )
            counts = embed_chunk(self.store_root, chunk, self.runner, self.runner.model_id)
            counts["pid"] = os.getpid()
            for kind, values in counts_by_kind.items():
                values.append(counts[kind])
        return {kind: np.asarray(values) for kind, values in counts_by_kind.items()}


def _has_token() -> bool:
    """Whether a Ray authentication token is at hand (environment or Ray's default file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path)


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``host:port`` (Ray itself retries
    an unreachable head for minutes). "auto" and addresses without a port are left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise SpecsearchError(
            f"cannot join the Ray cluster at {address}: nothing answers there "
            f"({err.strerror or err}); start it with `ray start --head` or check the address"
        ) from None


def _join(ray: Any, address: str) -> None:
    """Connect to the cluster at ``address``; a one-line error when that fails.

    A head started with ``ray start --head`` turns token authentication on by itself when this
    machine holds a token (``~/.ray/auth_token``, written by any earlier local Ray), but a client
    does not follow unless RAY_AUTH_MODE=token: the connection is retried that way once.
    """
    _reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
        return
    except Exception as err:  # noqa: BLE001 - Ray raises several kinds; one line for all
        first = err
    if "RAY_AUTH_MODE" not in os.environ and _has_token():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:
            ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
            return
        except Exception:  # noqa: BLE001
            del os.environ["RAY_AUTH_MODE"]
    reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
    raise SpecsearchError(
        f"cannot join the Ray cluster at {address}: {reason} (is it running? "
        "does it use token authentication: RAY_AUTH_MODE=token?)"
    ) from None


def embed_chunks_ray(
    store_root: str, chunks: list[Chunk], model: str, device: str, address: str | None = None
) -> dict[str, int]:
    """Run ``embed_chunk`` over ``chunks`` with Ray Data actors; returns rows per modality and
    the number of actors that ran chunks (``actors``)."""
    try:
        import ray
    except ImportError:
        raise SpecsearchError("--engine ray needs Ray: pip install 'specsearch[ray]'") from None
    started = False
    if not ray.is_initialized():
        if address:
            _join(ray, address)
        else:
            ray.init(
                log_to_driver=False,
                ignore_reinit_error=True,
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
            )
        started = True
    try:
        resources = ray.cluster_resources()
        n_gpus = int(resources.get("GPU", 0))
        use_gpu = device in ("auto", "cuda") and n_gpus > 0
        slots = n_gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // 2)
        slots = max(1, min(slots, len(chunks)))
        ds = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks))
        ds = ds.map_batches(
            _EmbedActor,
            fn_constructor_kwargs={
                "store_root": store_root,
                "model": model,
                "device": "cuda" if use_gpu else "cpu",
            },
            batch_size=1,
            concurrency=slots,
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else max(1, int(resources.get("CPU", 1)) // slots),
        )
        rows = ds.take_all()
    finally:
        if started:
            ray.shutdown()
    counts = {kind: int(sum(r[kind] for r in rows)) for kind in ("lrs", "xp", "non_finite")}
    counts["actors"] = len({int(r["pid"]) for r in rows})
    return counts
