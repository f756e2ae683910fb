"""Persist indexes: ``<modality>.faiss`` + ``<modality>.json`` in one folder, swapped atomically.

A reader must never pair a new index with the old JSON (or the reverse). Each save draws a new
version id; it is written into the JSON and appended to the ``.faiss`` file as a short trailer
(FAISS reads exactly the bytes it wrote and ignores what follows). The index is renamed into
place first and the JSON last; ``load_index`` checks that both carry the same version and, if a
save was in between, reads again. An index whose lists live on disk keeps them in
``<modality>.<version>.ivfdata`` beside it, so a new save never overwrites lists in use.

``extend_index`` adds the vectors of a new release in place when the index type allows (Flat,
IVF), skipping ids already present (or replacing their vectors, when asked), re-measures recall
and re-tunes; otherwise it rebuilds.
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

from .build import build_index, check_vectors, empty_copy, is_ivf, merge_ondisk, write_faiss
from .choose import choose_factory, index_family, nlist_for
from .device import CpuDevice
from .measure import (
    Batches,
    drop_self,
    exact_knn_streaming,
    sample_queries_streaming,
    set_search_params,
    tune_search_params,
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


def rebuild_reason(params: dict, n_total: int) -> str | None:
    """Why an index with ``params`` should be rebuilt rather than grown to n_total (None: grow)."""
    family = index_family(params["factory"])
    if family == "other":
        return f"a {params['factory']} index cannot grow in place"
    if not params.get("auto"):
        return None
    wanted = choose_factory(
        n_total, params["d"], params.get("memory_budget_bytes"), params.get("exact_threshold", 0)
    )
    if index_family(wanted) != family:
        return f"{n_total:,} vectors call for {wanted}, not {params['factory']}"
    if family == "ivf":
        nlist = int(params["factory"].split(",")[0].split("_")[0][3:])
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
    Flat and IVF indexes grow in place (on-disk lists are merged into a new ``.ivfdata``); other
    types, or an "auto" index whose size now calls for another kind (Flat -> IVF, or 16x the
    vectors an IVF was sized for), are rebuilt.

    ``database``, if given, returns batches of every vector the index holds after the extension
    (old and new); recall is then measured exactly, and rebuilds read from it. Without it, recall
    is measured against the index's own stored vectors (exact for Flat, decoded codes otherwise)
    and only Flat indexes can be rebuilt.
    """
    index, params = load_index(index_dir, modality, mmap=False)
    stale = np.zeros(0, np.int64)
    if replace_existing and len(new_ids):
        stale = np.unique(np.asarray(new_ids, dtype=np.int64)[np.isin(new_ids, index_ids(index))])
    in_place = index_family(params["factory"]) != "other"
    if stale.size and in_place and not params.get("ondisk"):
        index.remove_ids(faiss.IDSelectorBatch(stale))  # the index is in memory: the file stays
    # on-disk lists are mapped from the file readers use: their stale vectors are removed from
    # the merged copy below instead
    held = stale if params.get("ondisk") else np.zeros(0, np.int64)
    new_embeddings, new_ids = _new_vectors(new_embeddings, new_ids, index, also=held)
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
    n_total = index.ntotal + len(new_ids) - (replaced if params.get("ondisk") else 0)
    start = time.perf_counter()
    reason = rebuild_reason(params, n_total)
    if replaced and not in_place:
        reason = f"a {params['factory']} index cannot replace vectors in place"
    if reason:
        if params.get("ondisk") or (database is None and index_family(params["factory"]) != "flat"):
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
            device=device,
            show_progress=False,
            exclude_self=params.get("recall_queries", "").endswith("self excluded"),
        )
        new_params = {**params, **built, "rebuilt": reason}
        new_params.pop("version", None)
        new_params.pop("ivfdata", None)
    else:
        new_params = dict(params)
        if params.get("ondisk"):
            new_params["version"] = uuid.uuid4().hex
            new_params["ivfdata"] = f"{modality}.{new_params['version']}.ivfdata"
            fresh = ~np.isin(new_ids, stale)
            new_part = empty_copy(index)
            new_part.add_with_ids(new_embeddings[fresh], new_ids[fresh])
            sources = [
                faiss.extract_index_ivf(index).invlists,
                faiss.extract_index_ivf(new_part).invlists,
            ]
            index = merge_ondisk(index, sources, Path(index_dir) / new_params["ivfdata"])
            if stale.size:  # in the merged copy: the file readers map is untouched
                index.remove_ids(faiss.IDSelectorBatch(stale))
                index.add_with_ids(new_embeddings[~fresh], new_ids[~fresh])
        else:
            new_params.pop("version", None)
            index.add_with_ids(new_embeddings, new_ids)
        source = database or (lambda: iter_index_vectors(index))
        queries, query_ids = sample_queries_streaming(
            source(), min(params.get("n_queries", 1000), n_total), seed
        )
        if params.get("recall_queries", "").endswith("self excluded") and n_total > 1:
            k = min(k, n_total - 1)
            _, true_ids = exact_knn_streaming(queries, source(), k + 1)
            true_ids = drop_self(true_ids, query_ids, k)
        else:
            k, query_ids = min(k, n_total), None
            _, true_ids = exact_knn_streaming(queries, source(), k)
        tuning = tune_search_params(index, queries, true_ids, target, k, query_ids=query_ids)
        new_params.update(
            n=int(index.ntotal),
            target_recall=float(target),
            recall=round(float(tuning.recall), 5),
            search_params=tuning.search_params,
            tuning=tuning.curve,
            n_queries=len(queries),
            recall_reference="store" if database is not None else "index",
        )
    new_params["releases"] = covered
    new_params["added"] = int(len(new_ids)) - replaced
    new_params["replaced"] = replaced
    new_params["extended_seconds"] = round(time.perf_counter() - start, 3)
    return save_index(index, new_params, index_dir, modality)


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
