"""The embed stage: canonical shards -> per-star embeddings, chi^2 and predicted labels (Parquet).

Work is cut into chunks: a fixed range of rows of one shard file. Each chunk runs the encoders,
decoders and label heads once, in one batched forward, and writes one Parquet file per modality::

    STORE/embeddings/release=R/modality=lrs/part-<shard>-r<first row>.parquet
    STORE/embeddings/release=R/modality=xp/part-<shard>-r<first row>.parquet

(paths from ``Store.embedding_path``; the files are committed to the manifest at the end of the
run by ``Store.record_embeddings``, and readers see only committed files).

A chunk's files carry the model id and the checksum of the shard they came from in their Parquet
metadata, so a re-run skips every chunk already done with this model from the same shard: the
stage is incremental (a second run adds nothing) and resumable (a killed run, started again,
writes the remaining chunks and gives the same files as one clean run). The local engine and the
Ray engine run the same chunk function, so they write the same rows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SpecsearchError
from ..files import VERIFY, write_parquet_atomic
from ..progress import progress
from ..schema import LABELS, MODALITIES, column_matrix, embedding_schema
from ..store import Store, writes_store
from .residuals import chi2_per_pixel, xp_ivar

CHUNK_ROWS = 2048
_META_MODEL = b"specsearch.model_id"
_META_SHARD = b"specsearch.shard_sha256"
_META_FORMAT = b"specsearch.embedding_format"
EMBEDDING_FORMAT = b"2"  # 2: with the heads' features (what the score stage decodes)

# what the embed stage asks the model for, per batch (benchmarks/bench_embed.py times the same)
EMBED_OUTPUTS = (
    "lrs_embedding",
    "xp_embedding",
    "lrs_features",
    "xp_features",
    "lrs_recon",
    "xp_recon",
    "lrs_from_xp",
    "xp_from_lrs",
    "align_cos",
    "lrs_labels",
    "xp_labels",
)


@dataclass(frozen=True)
class Chunk:
    """A fixed row range of one shard file of one release."""

    release: str
    shard_path: str
    shard_sha256: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{Path(self.shard_path).stem.removeprefix('part-')}-r{self.start:08d}.parquet"


def plan_chunks(
    store: Store, release: str | None = None, chunk_rows: int = CHUNK_ROWS
) -> list[Chunk]:
    """Every chunk of the store's shards (all releases, or one), in a fixed order."""
    releases = [release] if release else store.releases()
    chunks = []
    for rel in releases:
        for path, checksum in store.shard_checksums(rel).items():
            n_rows = pq.ParquetFile(path).metadata.num_rows
            for start in range(0, n_rows, chunk_rows):
                chunks.append(
                    Chunk(rel, str(path), checksum, start, min(start + chunk_rows, n_rows))
                )
    return chunks


def chunk_outputs(store: Store, chunk: Chunk) -> dict[str, Path]:
    return {m: store.embedding_path(chunk.release, m, chunk.name) for m in MODALITIES}


def chunk_is_done(store: Store, chunk: Chunk, model_id: str) -> bool:
    """True when both modality files of the chunk exist, from this model and this shard."""
    for path in chunk_outputs(store, chunk).values():
        if not path.exists():
            return False
        meta = pq.read_schema(path).metadata or {}
        if (
            meta.get(_META_MODEL) != model_id.encode()
            or meta.get(_META_SHARD) != chunk.shard_sha256.encode()
            or meta.get(_META_FORMAT) != EMBEDDING_FORMAT
        ):
            return False
    return True


def read_chunk(chunk: Chunk) -> pa.Table:
    """The chunk's rows, reading only the row groups that hold them (memory stays per chunk)."""
    columns = ["source_id", "lrs_flux", "lrs_ivar", "xp_flux", "xp_flux_error"]
    shard = pq.ParquetFile(chunk.shard_path, **VERIFY)
    sizes = [shard.metadata.row_group(i).num_rows for i in range(shard.num_row_groups)]
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    groups = [i for i in range(len(sizes)) if starts[i] < chunk.stop and ends[i] > chunk.start]
    table = shard.read_row_groups(groups, columns=columns)
    return table.slice(chunk.start - int(starts[groups[0]]), chunk.stop - chunk.start)


def _modality_rows(
    modality: str,
    source_id: np.ndarray,
    present: np.ndarray,
    out: dict[str, Any],
    observed: dict[str, np.ndarray],
    align_cos: np.ndarray,
    model_id: str,
) -> pa.Table:
    """Rows of one modality's embedding file for the stars where that modality is present."""
    other = "xp" if modality == "lrs" else "lrs"
    idx = np.flatnonzero(present[modality])
    embedding = out[f"{modality}_embedding"][idx]
    dim = embedding.shape[1]
    flux, ivar = observed[f"{modality}_flux"][idx], observed[f"{modality}_ivar"][idx]
    recon_chi2, n_good = chi2_per_pixel(flux, ivar, out[f"{modality}_recon"][idx])
    cross = out.get(f"{modality}_from_{other}")
    cross_chi2 = np.full(len(idx), np.nan, dtype=np.float32)
    both = present[other][idx]
    if cross is not None and both.any():
        cross_chi2[both] = chi2_per_pixel(flux[both], ivar[both], cross[idx][both])[0]
    columns: dict[str, Any] = {
        "source_id": pa.array(source_id[idx], pa.int64()),
        "modality": pa.array([modality] * len(idx), pa.string()),
        "model_id": pa.array([model_id] * len(idx), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(embedding.astype(np.float16).ravel(), pa.float16()), dim
        ),
        "recon_chi2": pa.array(recon_chi2, pa.float32(), mask=np.isnan(recon_chi2)),
        "cross_chi2": pa.array(cross_chi2, pa.float32(), mask=np.isnan(cross_chi2)),
        "n_good_pixels": pa.array(n_good, pa.int32()),
        "align_cos": pa.array(align_cos[idx], pa.float32(), mask=np.isnan(align_cos[idx])),
    }
    features = out[f"{modality}_features"][idx]
    columns["features"] = pa.FixedSizeListArray.from_arrays(
        pa.array(features.astype(np.float16).ravel(), pa.float16()), features.shape[1]
    )
    labels = out[f"{modality}_labels"]
    for label in LABELS:
        mean = np.asarray(labels[label][idx], dtype=np.float32)
        sigma = np.asarray(labels[f"{label}_err"][idx], dtype=np.float32)
        columns[f"pred_{label}"] = pa.array(mean, pa.float32())
        columns[f"pred_{label}_err"] = pa.array(sigma, pa.float32())
    return pa.table(columns, schema=embedding_schema(dim, features.shape[1]))


def embed_chunk(store_root: str, chunk: Chunk, runner: Any, model_id: str) -> dict[str, int]:
    """Run the model over one chunk and write its files atomically. Returns rows per modality."""
    store = Store(store_root, create=False)
    table = read_chunk(chunk)
    source_id = table.column("source_id").to_numpy()
    lrs_flux, lrs_ivar = column_matrix(table, "lrs_flux"), column_matrix(table, "lrs_ivar")
    xp_flux, xp_err = column_matrix(table, "xp_flux"), column_matrix(table, "xp_flux_error")
    out = runner.run_batch(
        lrs_flux=lrs_flux,
        lrs_ivar=lrs_ivar,
        xp_flux=xp_flux,
        xp_flux_error=xp_err,
        outputs=EMBED_OUTPUTS,
    )
    # a modality is present where the runner could use it (a row of nulls or no good pixel is not)
    present = {"lrs": out["has_lrs"], "xp": out["has_xp"]}
    # no NaN or infinite vector is ever written (they are stored as float16): such a row is left
    # out of its modality's file and counted
    unusable = {}
    for modality in MODALITIES:
        finite = np.ones(len(source_id), dtype=bool)
        for name in (f"{modality}_embedding", f"{modality}_features"):
            finite &= np.isfinite(np.asarray(out[name]).astype(np.float16)).all(axis=1)
        unusable[modality] = present[modality] & ~finite
        present[modality] = present[modality] & finite
    align_cos = out["align_cos"]
    observed = {
        "lrs_flux": lrs_flux,
        "lrs_ivar": lrs_ivar,
        "xp_flux": xp_flux,
        "xp_ivar": xp_ivar(xp_err),
    }
    counts = {}
    metadata = {
        _META_MODEL: model_id.encode(),
        _META_SHARD: chunk.shard_sha256.encode(),
        _META_FORMAT: EMBEDDING_FORMAT,
    }
    for modality, path in chunk_outputs(store, chunk).items():
        rows = _modality_rows(modality, source_id, present, out, observed, align_cos, model_id)
        rows = rows.replace_schema_metadata(metadata)
        write_parquet_atomic(rows, path, row_group_size=4096)
        counts[modality] = rows.num_rows
    counts["non_finite"] = int(sum(u.sum() for u in unusable.values()))
    return counts


def _load_runner(model: str, device: str) -> Any:
    from ..models.runner import SpecCLIPRunner

    return SpecCLIPRunner(model, device=device)


@dataclass(frozen=True)
class EmbedResult:
    """What one embed run did: spectra embedded per modality, chunks run and already done."""

    model_id: str
    lrs: int
    xp: int
    chunks: int
    already_done: int
    seconds: float
    non_finite: int = 0  # spectra whose outputs were not finite, left out of the files
    workers: int = 1  # processes that ran the model (Ray actors with --engine ray)

    def __str__(self) -> str:
        if not self.chunks:
            return (
                f"embed: nothing to do ({self.already_done} chunks already embedded "
                f"with {self.model_id})"
            )
        text = (
            f"embed: {self.lrs} LRS and {self.xp} XP spectra embedded with {self.model_id} "
            f"in {self.chunks} chunks ({self.already_done} already done)"
        )
        if self.workers > 1:
            text += f" by {self.workers} Ray actors"
        if self.non_finite:
            text += f"; {self.non_finite} spectra gave non-finite outputs and were left out"
        return text


@writes_store("embed")
def embed_store(
    store: str | os.PathLike | Store,
    release: str | None = None,
    model: str = "default",
    engine: str = "local",
    device: str = "auto",
    ray_address: str | None = None,
    show_progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
    max_chunks: int | None = None,
) -> EmbedResult:
    """Embed every chunk of the store's shards not yet embedded with ``model``.

    ``model``: a model id or directory. ``chunk_rows``: rows per chunk (and per output file).
    ``max_chunks``: stop after this many chunks (what a killed run leaves behind; for tests).
    """
    start = time.perf_counter()
    if engine not in ("local", "ray"):
        raise SpecsearchError(f"--engine must be local or ray, not {engine!r}")
    st = store
    runner = _load_runner(model, device)
    model_id = runner.model_id
    recorded = st.embeddings_model()
    if recorded and recorded != model_id:
        raise SpecsearchError(
            f"{st.root}: embedded with model {recorded}; use --model {recorded} or a new store for {model_id}"
        )
    planned = plan_chunks(st, None, chunk_rows)  # every release: what the manifest should list
    chunks = [c for c in planned if release in (None, c.release)]
    pending = [c for c in planned if not chunk_is_done(st, c, model_id)]
    todo = [c for c in pending if release in (None, c.release)][:max_chunks]
    counts = {"lrs": 0, "xp": 0, "non_finite": 0}
    if todo:
        if engine == "ray":
            from .embed_ray import embed_chunks_ray

            counts = embed_chunks_ray(str(st.root), todo, model, device, ray_address)
        else:
            counts = _embed_chunks_local(st, todo, runner, model_id, show_progress)
    left = set(pending) - set(todo)  # chunks still to embed (another release, max_chunks)
    done: dict[str, dict[str, list[str]]] = {}
    missing: dict[str, int] = {}
    for chunk in planned:
        if chunk in left:
            missing[chunk.release] = missing.get(chunk.release, 0) + 1
            continue
        for modality in MODALITIES:
            done.setdefault(chunk.release, {}).setdefault(modality, []).append(chunk.name)
    st.record_embeddings(model_id, done, missing)
    return EmbedResult(
        model_id=model_id,
        lrs=counts["lrs"],
        xp=counts["xp"],
        chunks=len(todo),
        already_done=len(chunks) - len([c for c in pending if c in chunks]),
        non_finite=counts.get("non_finite", 0),
        seconds=time.perf_counter() - start,
        workers=counts.get("actors", 1),
    )


def _embed_chunks_local(
    st: Store, todo: list[Chunk], runner: Any, model_id: str, show_progress: bool
) -> dict[str, int]:
    total = {"lrs": 0, "xp": 0, "non_finite": 0}
    n_rows = sum(c.stop - c.start for c in todo)
    with progress("embed", n_rows, show_progress, unit="stars") as advance:
        for chunk in todo:
            counts = embed_chunk(str(st.root), chunk, runner, model_id)
            for m in total:
                total[m] += counts[m]
            advance(chunk.stop - chunk.start)
    return total
