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
        counts_by_kind: dict[str, list[int]] = {"lrs": [], "xp": [], "non_finite": []}
        for i in range(len(batch["start"])):
            chunk = Chunk(
                release=str(batch["release"][i]),
                shard_path=str(batch["shard_path"][i]),
                shard_sha256=str(batch["shard_sha256"][i]),
                start=int(batch["start"][i]),
                stop=int(batch["stop"][i]),
            )
            counts = embed_chunk(self.store_root, chunk, self.runner, self.runner.model_id)
            for kind, values in counts_by_kind.items():
                values.append(counts[kind])
        return {kind: np.asarray(values) for kind, values in counts_by_kind.items()}


def embed_chunks_ray(
    store_root: str, chunks: list[Chunk], model: str, device: str, address: str | None = None
) -> dict[str, int]:
    """Run ``embed_chunk`` over ``chunks`` with Ray Data actors; returns rows per modality."""
    try:
        import ray
    except ImportError:
        raise SpecsearchError("--engine ray needs Ray: pip install 'specsearch[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = (
            {"address": address}
            if address
            else {
                "num_cpus": os.cpu_count() or 1,
                "include_dashboard": False,
            }
        )
        ray.init(log_to_driver=False, ignore_reinit_error=True, **kwargs)
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
    return {kind: int(sum(r[kind] for r in rows)) for kind in ("lrs", "xp", "non_finite")}
