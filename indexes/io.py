"""Persist indexes: ``<modality>.faiss`` + ``<modality>.json`` in one folder, swapped atomically.

A reader must never pair a new index with the old JSON (or the reverse). Each save draws a new
version id; it is written into the JSON and appended to the ``.faiss`` file as a short trailer
(FAISS reads exactly the bytes it wrote and ignores what follows). The index is renamed into
place first and the JSON last; ``load_index`` checks that both carry the same version and, if a
save was in between, reads again. An index whose lists live on disk keeps them in
``<modality>.<version>.ivfdata`` beside it, so a new save never overwrites lists in use.

``extend_index`` adds the vectors of a new release in place when the index type allows (Flat,
IVF, HNSW graphs), skipping ids already present (or replacing their vectors, when asked: Flat and
IVF remove the old ones, a graph cannot and is rebuilt), re-measures recall and re-tunes;
otherwise it rebuilds.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import uuid
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import faiss
import numpy as np

from specsearch.errors import SpecsearchError
from specsearch.files import atomic_path, write_json_atomic

from .build import build_index, check_vectors, empty_copy, merge_ondisk, write_faiss
from .choose import default_memory_budget, index_bytes, index_family, nlist_for
from .device import CpuDevice
from .make import is_ivf
from .measure import (
    Batches,
    query_sets_streaming,
    sample_queries_streaming,
    set_search_params,
    tune,
)

TRAILER_MAGIC = b"\nspecsearch-index-version:"
TRAILER_LENGTH = len(TRAILER_MAGIC) + 32  # a uuid4 in hex
MMAP_BYTES = 2 << 30
"""``load_index(mmap=None)`` memory-maps index files larger than this."""


def index_paths(index_dir: Path, modality: str) -> tuple[Path, Path]:
    """(``<modality>.faiss``, ``<modality>.json``) in ``index_dir``."""
    index_dir = Path(index_dir)
    return index_dir / f"{modality}.faiss", index_dir / f"{modality}.json"


def save_index(index: faiss.Index, params: dict, index_dir: Path, modality: str) -> dict:
    """Write ``index`` and ``params`` atomically as a pair; return the params as saved.

    ``params`` gains ``version`` (new unless the caller set one, as on-disk builds do to name
    their ``.ivfdata``), ``modality`` and ``saved`` (UTC time). The ``.ivfdata`` file of the
    index this one replaces is removed after the swap.
    """
    index_path, json_path = index_paths(index_dir, modality)
    previous = _previous_ivfdata(json_path)
    params = dict(params)
    params["version"] = params.get("version") or uuid.uuid4().hex
    params["modality"] = modality
    params["saved"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if len(params["version"]) != 32:
        raise ValueError("an index version must be 32 hex characters (uuid4().hex)")
    with atomic_path(index_path) as tmp:
        write_faiss(index, tmp)
        with open(tmp, "ab") as f:
            f.write(TRAILER_MAGIC + params["version"].encode("ascii"))
    write_json_atomic(params, json_path)
    if previous and previous != params.get("ivfdata"):
        # readers that mapped it keep their mapping
        (Path(index_dir) / previous).unlink(missing_ok=True)
    return params


def _previous_ivfdata(json_path: Path) -> str | None:
    try:
        return json.loads(json_path.read_text()).get("ivfdata")
    except (OSError, ValueError, AttributeError):
        return None


def read_params(index_dir: Path, modality: str) -> dict:
    """The JSON saved beside an index."""
    _, json_path = index_paths(index_dir, modality)
    try:
        return json.loads(json_path.read_text())
    except FileNotFoundError:
        raise SpecsearchError(
            f"{json_path}: no {modality} index (run 'specsearch index build')"
        ) from None
    except json.JSONDecodeError as err:
        raise SpecsearchError(f"{json_path}: corrupt index parameters ({err.msg})") from None


def _file_version(index_path: Path) -> str | None:
    try:
        with open(index_path, "rb") as f:
            f.seek(0, 2)
            if f.tell() < TRAILER_LENGTH:
                return None
            f.seek(-TRAILER_LENGTH, 2)
            trailer = f.read(TRAILER_LENGTH)
    except FileNotFoundError:
        return None
    if not trailer.startswith(TRAILER_MAGIC):
        return None
    return trailer[len(TRAILER_MAGIC) :].decode("ascii", "replace")


def load_index(
    index_dir: Path, modality: str, mmap: bool | None = None, attempts: int = 20
) -> tuple[faiss.Index, dict]:
    """Read a saved index and its params, with the saved search parameters applied.

    ``mmap``: memory-map the inverted lists / codes instead of reading them (True), read them
    (False), or map only files over MMAP_BYTES (None). Indexes with on-disk lists always map them.
    """
    index_path, json_path = index_paths(index_dir, modality)
    for _ in range(attempts):
        params = read_params(index_dir, modality)
        if _file_version(index_path) == params.get("version"):
            big = index_path.stat().st_size > MMAP_BYTES
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR
            if mmap or (mmap is None and big):
                flags |= faiss.IO_FLAG_MMAP
            try:
                index = faiss.read_index(str(index_path), flags)
            except RuntimeError as err:
                raise SpecsearchError(
                    f"{index_path}: unreadable index ({_first_line(err)})"
                ) from None
            # a save may have swapped the file while it was read: check it is still the same one
            if _file_version(index_path) == params["version"]:
                set_search_params(index, params.get("search_params", ""))
                return index, params
        time.sleep(0.05)  # a save is between its two renames
    if not index_path.exists():
        raise SpecsearchError(f"{index_path}: no {modality} index (run 'specsearch index build')")
    raise SpecsearchError(f"{index_path}: does not match {json_path.name} (rebuild the index)")


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


# --- what an index holds


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids held by an IDMap or IVF index, int64, in storage order."""
    concrete = faiss.downcast_index(index)  # a view: `index` must stay referenced meanwhile
    if isinstance(concrete, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(concrete.id_map).astype(np.int64)
    if is_ivf(index):
        lists = faiss.extract_index_ivf(index).invlists
        chunks = [_list_ids(lists, number) for number in range(lists.nlist)]
        return np.concatenate(chunks) if chunks else np.empty(0, np.int64)
    raise SpecsearchError(f"cannot list the ids of a {type(index).__name__}")


def _list_ids(lists: faiss.InvertedLists, number: int) -> np.ndarray:
    size = lists.list_size(number)
    if size == 0:
        return np.empty(0, np.int64)
    pointer = lists.get_ids(number)
    ids = faiss.rev_swig_ptr(pointer, size).copy()
    lists.release_ids(number, pointer)
    return ids


def iter_index_vectors(
    index: faiss.Index, batch_size: int = 65_536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The vectors an index holds, with their ids, in batches.

    Exact for Flat; for compressed IVF codes (SQ, PQ) these are the decoded approximations.
    """
    concrete = faiss.downcast_index(index)  # a view: `index` must stay referenced meanwhile
    if isinstance(concrete, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(concrete.index)
        ids = faiss.vector_to_array(concrete.id_map).astype(np.int64)
        for start in range(0, index.ntotal, batch_size):
            stop = min(start + batch_size, index.ntotal)
            yield inner.reconstruct_n(start, stop - start), ids[start:stop]
        return
    if not isinstance(concrete, faiss.IndexIVF):
        raise SpecsearchError(f"cannot read the vectors of a {type(concrete).__name__}")
    ivf = concrete
    lists = ivf.invlists
    prefix_bytes = ivf.coarse_code_size()
    codes, ids, held = [], [], 0
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size == 0:
            continue
        pointer = lists.get_codes(number)
        list_codes = faiss.rev_swig_ptr(pointer, size * ivf.code_size).reshape(size, -1)
        # sa_decode takes the list number, little-endian, in front of each code
        prefix = (
            np.frombuffer(number.to_bytes(prefix_bytes, "little"), np.uint8)
            if prefix_bytes
            else None
        )
        full = np.empty((size, prefix_bytes + ivf.code_size), np.uint8)
        full[:, :prefix_bytes] = prefix if prefix is not None else 0
        full[:, prefix_bytes:] = list_codes
        lists.release_codes(number, pointer)
        codes.append(full)
        ids.append(_list_ids(lists, number))
        held += size
        if held >= batch_size:
            yield ivf.sa_decode(np.concatenate(codes)), np.concatenate(ids)
            codes, ids, held = [], [], 0
    if held:
        yield ivf.sa_decode(np.concatenate(codes)), np.concatenate(ids)


# --- growing an index


RECHOOSE_GROWTH = 4
"""An index of the measured choice is chosen afresh once its set is this many times the size it
was chosen for: the frontier moves with n (a graph's walk grows as log n, a list as sqrt n)."""


def rebuild_reason(params: dict, n_total: int) -> str | None:
    """Why an index with ``params`` should be rebuilt rather than grown to n_total (None: grow)."""
    factory, d = params["factory"], params["d"]
    family = index_family(factory)
    if family == "other":
        return f"a {factory} index cannot grow in place"
    if not params.get("auto"):
        return None
    budget = params.get("memory_budget_bytes") or default_memory_budget()
    if family == "flat":
        exact = n_total < params.get("exact_threshold", 0)
        if not exact or index_bytes(factory, n_total, d) > budget:
            return f"{n_total:,} vectors call for an approximate index, not {factory}"
        return None
    if not params.get("ondisk") and index_bytes(factory, n_total, d) > budget:
        return f"{n_total:,} vectors of {factory} no longer fit the memory budget"
    chosen_at = params.get("choice", {}).get("n")
    if chosen_at and n_total >= RECHOOSE_GROWTH * chosen_at:
        return f"{n_total:,} vectors are {n_total / chosen_at:.1f}x the {chosen_at:,} chosen for"
    if family == "ivf":
        nlist = int(factory.split(",")[0].split("_")[0][3:])
        if nlist_for(n_total) >= 4 * nlist:
            return f"{n_total:,} vectors outgrew {nlist} inverted lists"
    return None


def extend_index(
    index_dir: Path,
    modality: str,
    new_embeddings: np.ndarray,
    new_ids: np.ndarray,
    *,
    database: Batches | None = None,
    releases: list[str] | None = None,
    target_recall: float | None = None,
    replace_existing: bool = False,
    seed: int = 0,
    device: str | CpuDevice = "cpu",
) -> dict:
    """Add new vectors to a saved index and swap it atomically; return the new params.

    Ids already in the index (and repeats within ``new_ids``) are skipped, so adding the same
    release twice changes nothing (nothing is written; the returned params have ``added`` 0);
    with ``replace_existing`` their stored vectors are replaced by the new ones instead
    (``replaced`` counts them).
    Flat, IVF and graph (HNSW) indexes grow in place (on-disk lists are merged into a new
    ``.ivfdata``); a graph whose vectors must be replaced (it cannot remove any), other types,
    and an "auto" index whose size now calls for another choice (``rebuild_reason``) are rebuilt.

    Recall is re-measured on stars of the index (self excluded) and on up to ``n_queries`` of
    the new stars, held out of the index until it is re-tuned (when there are at least 20).
    ``database``, if given, returns batches of every vector the index holds after the extension
    (old and new); recall is then measured exactly, and rebuilds read from it. Without it, recall
    is measured against the index's own stored vectors (exact for Flat, decoded codes otherwise)
    and only Flat indexes can be rebuilt.
    """
    index, params = load_index(index_dir, modality, mmap=False)
    family = index_family(params["factory"])
    removable = family in ("flat", "ivf")  # HNSW cannot remove ids
    stale = np.zeros(0, np.int64)
    if replace_existing and len(new_ids):
        stale = np.unique(np.asarray(new_ids, dtype=np.int64)[np.isin(new_ids, index_ids(index))])
    if stale.size and removable and not params.get("ondisk"):
        index.remove_ids(faiss.IDSelectorBatch(stale))  # the index is in memory: the file stays
    # on-disk lists are mapped from the file readers use: their stale vectors are removed from
    # the merged copy below instead; a graph keeps them until it is rebuilt
    kept_stale = stale if params.get("ondisk") or not removable else np.zeros(0, np.int64)
    new_embeddings, new_ids = _new_vectors(new_embeddings, new_ids, index, also=kept_stale)
    replaced = int(stale.size)
    covered = sorted(set(params.get("releases", [])) | set(releases or []))
    if len(new_ids) == 0:
        if covered != sorted(params.get("releases", [])):  # a release with no new stars
            params["releases"] = covered
            write_json_atomic(
                params, index_paths(index_dir, modality)[1]
            )  # same version: same pair
        return {**params, "added": 0, "replaced": 0}
    target = target_recall if target_recall is not None else params["target_recall"]
    k = params["k"]
    n_total = index.ntotal + len(new_ids) - (replaced if kept_stale.size else 0)
    start = time.perf_counter()
    reason = rebuild_reason(params, n_total)
    if replaced and not removable:
        reason = f"a {params['factory']} index cannot replace vectors in place"
    if reason:
        if params.get("ondisk") or (database is None and family != "flat"):
            raise SpecsearchError(
                f"{modality} index must be rebuilt ({reason}): run 'specsearch index build'"
            )
        source = database or (lambda: chain(iter_index_vectors(index), [(new_embeddings, new_ids)]))
        batches = list(source())
        embeddings = np.concatenate([vectors for vectors, _ in batches])
        ids = np.concatenate([batch_ids for _, batch_ids in batches])
        del batches
        factory = "auto" if params.get("auto") else params["factory"]
        index, built = build_index(
            embeddings,
            ids,
            factory=factory,
            target_recall=target,
            memory_budget_bytes=params.get("memory_budget_bytes"),
            k=k,
            seed=seed,
            exact_threshold=params.get("exact_threshold", 0),
            speed_for=params.get("choice", {}).get("speed_for", "single"),
            device=device,
            show_progress=False,
            exclude_self="self excluded" in params.get("recall_queries", ""),
        )
        new_params = {**params, **built, "rebuilt": reason}
        new_params.pop("version", None)
        new_params.pop("ivfdata", None)
    else:
        new_params = dict(params)
        # up to n_queries new stars wait outside the index until it is re-tuned
        n_held = min(_n_queries(params), len(new_ids) // 2) if len(new_ids) >= 20 else 0
        rng = np.random.default_rng(seed)
        adding = np.ones(len(new_ids), bool)
        adding[rng.choice(len(new_ids), n_held, replace=False)] = False
        if params.get("ondisk"):
            new_params["version"] = uuid.uuid4().hex
            new_params["ivfdata"] = f"{modality}.{new_params['version']}.ivfdata"
            fresh = ~np.isin(new_ids, stale)
            new_part = empty_copy(index)
            new_part.add_with_ids(new_embeddings[fresh & adding], new_ids[fresh & adding])
            sources = [
                faiss.extract_index_ivf(index).invlists,
                faiss.extract_index_ivf(new_part).invlists,
            ]
            index = merge_ondisk(index, sources, Path(index_dir) / new_params["ivfdata"])
            if stale.size:  # in the merged copy: the file readers map is untouched
                index.remove_ids(faiss.IDSelectorBatch(stale))
                index.add_with_ids(new_embeddings[~fresh & adding], new_ids[~fresh & adding])
        else:
            new_params.pop("version", None)
            index.add_with_ids(new_embeddings[adding], new_ids[adding])
        held_ids = new_ids[~adding]
        source = _without(database or (lambda: iter_index_vectors(index)), held_ids)
        n_indexed = n_total - n_held
        queries, query_ids = sample_queries_streaming(
            source(), min(_n_queries(params), n_indexed), seed
        )
        exclude_self = "self excluded" in params.get("recall_queries", "") and n_indexed > 1
        k = min(k, n_indexed - 1 if exclude_self else n_indexed)
        sets = query_sets_streaming(
            source(), queries, query_ids, new_embeddings[~adding], k, exclude_self=exclude_self
        )
        tuning = tune(index, sets, target, k)
        index.add_with_ids(new_embeddings[~adding], held_ids)
        new_params.update(
            n=int(index.ntotal),
            target_recall=float(target),
            recall=round(float(tuning.recall), 5),
            recalls=tuning.recalls,
            search_params=tuning.search_params,
            tuning=tuning.curve,
            n_queries={s.kind: len(s.queries) for s in sets},
            recall_reference="store" if database is not None else "index",
        )
    new_params["releases"] = covered
    new_params["added"] = int(len(new_ids)) - replaced
    new_params["replaced"] = replaced
    new_params["extended_seconds"] = round(time.perf_counter() - start, 3)
    return save_index(index, new_params, index_dir, modality)


def _n_queries(params: dict) -> int:
    """The queries of each kind an index was tuned with (an int in older parameter files)."""
    counts = params.get("n_queries", 1000)
    return max(counts.values()) if isinstance(counts, dict) else int(counts)


def _without(batches: Batches, ids: np.ndarray) -> Batches:
    """``batches`` less the vectors whose id is in ``ids``."""
    if not len(ids):
        return batches

    def filtered():
        for vectors, batch_ids in batches():
            keep = ~np.isin(batch_ids, ids)
            yield vectors[keep], batch_ids[keep]

    return filtered


def _new_vectors(
    embeddings: np.ndarray, ids: np.ndarray, index: faiss.Index, also: np.ndarray | None = None
):
    """The rows whose id is neither in ``index`` (unless in ``also``) nor earlier in ``ids``."""
    ids = np.asarray(ids)
    if len(ids) == 0:
        return np.empty((0, index.d), np.float32), np.empty(0, np.int64)
    _, first = np.unique(ids, return_index=True)
    keep = np.zeros(len(ids), bool)
    keep[first] = True
    held = index_ids(index)
    if also is not None and also.size:
        held = held[~np.isin(held, also)]
    keep &= ~np.isin(ids, held)
    return check_vectors(np.asarray(embeddings)[keep], ids[keep])
