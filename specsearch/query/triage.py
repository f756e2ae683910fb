"""Triage that learns: the users' marks, and the ranking they adjust.

A user marks a star ``boring``, ``artefact`` or ``interesting`` (``mark``, or a CSV through
``import_marks``); every mark is kept in ``STORE/marks/marks.parquet`` and the latest one of a
star counts. Marks are keyed by source_id, so they hold in every later release, and they never
change the stored scores: ``triaged`` adds an adjusted score and rank beside them.

The adjustment: a star marked boring or artefact, and every star that looks like it, is pushed
down. "Looks like" is measured twice, and the closer likeness counts: in the embedding space
(what the star is: both spectra side by side where it has both, else its one spectrum) and in
the residual signature of the scores (how it departs from the model: where its spectra sit above
or below the predictions). A marked star reaches the stars that would count it among their own
neighbours: a star at cosine distance d from it, whose 20th nearest star (among up to SAMPLE
stars of the release) is at distance d20, keeps min(d / d20, 1) of its score, and the product of
that over the marked stars (several marks of a kind reach further than one). An anomaly that
has its own kind around it thus takes them down with it, and an isolated one only itself. The
reason is shown ("like 1234 marked boring (residuals cos 0.91)"). A star
marked ``interesting`` seeds "more like this": its nearest unmarked stars (``more_like``).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import SpecsearchError
from ..schema import MARKS, MARKS_SCHEMA, MODALITIES, column_matrix
from ..store import Store

NEIGHBOURS = 20
SAMPLE = 20_000
"""Stars of the release each star's 20th-neighbour distance is measured among."""
DOWN = ("boring", "artefact")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def mark(
    store: str | os.PathLike | Store,
    source_ids,
    what: str,
    note: str = "",
    user: str | None = None,
    release: str | None = None,
) -> int:
    """Mark stars ``boring``, ``artefact`` or ``interesting``; returns the marks now held."""
    st = Store.open(store)
    if what not in MARKS:
        raise SpecsearchError(f"a mark is one of {', '.join(MARKS)}, not {what!r}")
    ids = np.atleast_1d(np.asarray(source_ids, dtype=np.int64))
    known = st.read_shards(columns=["source_id"], source_ids=ids).column("source_id").to_numpy()
    missing = np.setdiff1d(ids, known)
    if missing.size:
        raise SpecsearchError(f"source_id {int(missing[0])} is not in {st.root}")
    if release is not None and release not in st.releases():
        raise SpecsearchError(f"{st.root}: release {release} is not in the store")
    n = len(ids)
    table = pa.table(
        {
            "source_id": pa.array(ids, pa.int64()),
            "release": pa.array([release] * n, pa.string()),
            "mark": pa.array([what] * n, pa.string()),
            "note": pa.array([note] * n, pa.string()),
            "user": pa.array([user or _user()] * n, pa.string()),
            "time": pa.array([_now()] * n, pa.timestamp("s", tz="UTC")),
        },
        schema=MARKS_SCHEMA,
    )
    return st.add_marks(table)


def import_marks(store: str | os.PathLike | Store, path: str | os.PathLike) -> int:
    """Marks from a CSV (or Parquet) with columns source_id and mark (note, user, release and
    time optional); returns how many were added."""
    import pyarrow.csv as pacsv

    st = Store.open(store)
    path = Path(path)
    if not path.exists():
        raise SpecsearchError(f"{path}: no such file")
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    except pa.ArrowInvalid as err:
        raise SpecsearchError(f"{path}: {str(err).splitlines()[0]}") from None
    for column in ("source_id", "mark"):
        if column not in table.column_names:
            raise SpecsearchError(f"{path}: missing column {column}")
    bad = set(table.column("mark").to_pylist()) - set(MARKS)
    if bad:
        raise SpecsearchError(f"{path}: unknown mark {sorted(bad)[0]!r}; use {', '.join(MARKS)}")
    n = table.num_rows
    columns = {
        "source_id": table.column("source_id").cast(pa.int64()),
        "mark": table.column("mark").cast(pa.string()),
    }
    for name, default in (("release", None), ("note", ""), ("user", _user())):
        columns[name] = (
            table.column(name).cast(pa.string())
            if name in table.column_names
            else pa.array([default] * n, pa.string())
        )
    columns["time"] = (
        table.column("time").cast(pa.timestamp("s", tz="UTC"))
        if "time" in table.column_names
        else pa.array([_now()] * n, pa.timestamp("s", tz="UTC"))
    )
    st.add_marks(pa.table(columns).select(MARKS_SCHEMA.names).cast(MARKS_SCHEMA))
    return n


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def latest_marks(store: Store) -> pa.Table:
    """The latest mark of each marked star (MARKS_SCHEMA)."""
    marks = store.read_marks()
    if marks.num_rows == 0:
        return marks
    order = np.lexsort(
        (np.arange(marks.num_rows), marks.column("time").cast(pa.int64()).to_numpy())
    )
    marks = marks.take(order)
    ids = marks.column("source_id").to_numpy()
    _, first_from_end = np.unique(ids[::-1], return_index=True)
    last = np.zeros(len(ids), bool)
    last[len(ids) - 1 - first_from_end] = True
    return marks.filter(pa.array(last))


def _space_vectors(
    store: Store, source_ids: np.ndarray, release: str | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per star: which space it is compared in (pair, lrs or xp) and its unit vector in each
    space it has (NaN rows where not)."""
    n = len(source_ids)
    vectors: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        try:
            rows = store.embeddings(
                modality, release=release, columns=["source_id", "embedding"], source_ids=source_ids
            )
        except SpecsearchError:
            continue
        at = {int(i): j for j, i in enumerate(source_ids)}
        matrix = column_matrix(rows, "embedding")
        out = np.full((n, matrix.shape[1]), np.nan, np.float32)
        position = [at[int(i)] for i in rows.column("source_id").to_numpy()]
        out[position] = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
        vectors[modality] = out
    has = {m: np.isfinite(v).all(axis=1) for m, v in vectors.items()}
    both = has.get("lrs", np.zeros(n, bool)) & has.get("xp", np.zeros(n, bool))
    if "lrs" in vectors and "xp" in vectors:
        vectors["pair"] = np.hstack([vectors["lrs"], vectors["xp"]]) / np.sqrt(2.0)
    space = np.where(both, "pair", np.where(has.get("lrs", np.zeros(n, bool)), "lrs", "xp"))
    return space, vectors


def triaged(
    store: str | os.PathLike | Store, release: str, scores: pa.Table | None = None
) -> pa.Table:
    """A release's score rows with ``mark`` (the star's own latest mark), ``adjusted_score``,
    ``adjusted_rank`` and ``triage`` (why it was pushed down), strangest adjusted first."""
    st = Store.open(store)
    if scores is None:
        entry = st.score_entry(release)
        if not entry:
            raise SpecsearchError(f"{st.root}: release {release} is not scored")
        scores = st.read_scores(release)
    ids = scores.column("source_id").to_numpy()
    score = np.nan_to_num(scores.column("score").to_numpy(zero_copy_only=False), nan=0.0)
    marks = latest_marks(st)
    own = dict(
        zip(marks.column("source_id").to_pylist(), marks.column("mark").to_pylist(), strict=True)
    )
    keep = np.ones(len(ids))
    reason = [""] * len(ids)
    down = marks.filter(pc.is_in(marks.column("mark"), pa.array(DOWN)))
    if down.num_rows:
        keep, reason = _push_down(st, release, ids, down, scores)
    adjusted = score * keep
    order = np.lexsort((ids, -adjusted))
    rank = np.empty(len(ids), np.int32)
    rank[order] = np.arange(1, len(ids) + 1)
    table = scores.append_column("mark", pa.array([own.get(int(i)) for i in ids], pa.string()))
    table = table.append_column("adjusted_score", pa.array(adjusted.astype(np.float32)))
    table = table.append_column("adjusted_rank", pa.array(rank))
    table = table.append_column("triage", pa.array(reason, pa.string()))
    return table.sort_by("adjusted_rank")


def _push_down(
    st: Store, release: str, ids: np.ndarray, down: pa.Table, scores: pa.Table
) -> tuple[np.ndarray, list[str]]:
    """The fraction of its score each star keeps, and the reason, given the boring marks: the
    least it keeps by either likeness, what it is (embeddings) or how it is anomalous (the
    residual signature of the scores)."""
    marked = down.column("source_id").to_numpy()
    kinds = down.column("mark").to_pylist()
    keep = np.ones(len(ids))
    reason = [""] * len(ids)
    space, vectors = _space_vectors(st, ids, release)
    marked_space, marked_vectors = _space_vectors(st, marked, None)
    spaces = [
        (np.flatnonzero(space == name), vectors.get(name), marked_vectors.get(name), "embedding")
        for name in ("pair", "lrs", "xp")
    ]
    spaces.append(
        (
            np.arange(len(ids)),
            _signatures(scores, ids),
            _signatures(_latest_scores(st, marked), marked),
            "residuals",
        )
    )
    for rows, own, targets_vectors, what in spaces:
        if own is None or targets_vectors is None or not rows.size:
            continue
        targets = np.flatnonzero(np.isfinite(targets_vectors).all(axis=1))
        targets = targets[np.linalg.norm(targets_vectors[targets], axis=1) > 0]
        if not targets.size:
            continue
        kept, closest, sims = _reach(own[rows], targets_vectors[targets], ids[rows])
        for position, i in enumerate(rows):
            if kept[position] < keep[i]:
                keep[i] = kept[position]
                b = targets[closest[position]]
                reason[i] = (
                    f"marked {kinds[b]}"
                    if ids[i] == marked[b]
                    else f"like {int(marked[b])} marked {kinds[b]} "
                    f"({what} cos {sims[position]:.3f})"
                )
    # a marked star keeps nothing, exactly: its likeness to itself is 1 only to rounding
    kind_of = dict(zip(marked.tolist(), kinds, strict=True))
    for i in np.flatnonzero(np.isin(ids, marked)):
        keep[i], reason[i] = 0.0, f"marked {kind_of[int(ids[i])]}"
    return keep, reason


def _reach(
    own: np.ndarray, targets: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fraction kept, the closest marked star, its cosine) per star: the product over marked
    stars of min(d / dk, 1), d the cosine distance to the marked star, dk the star's own
    distance to its NEIGHBOURS-th nearest star of a sample of the release (so a marked star
    reaches those that would call it a neighbour)."""
    import faiss

    own = np.ascontiguousarray(np.nan_to_num(own, nan=0.0), dtype=np.float32)
    sims = own @ np.nan_to_num(targets, nan=0.0).astype(np.float32).T  # (stars, marked)
    sample = np.random.default_rng(0).permutation(len(own))[:SAMPLE]
    k = min(NEIGHBOURS, len(sample) - 1)
    if k < 1:
        return np.ones(len(own)), np.zeros(len(own), np.int64), np.zeros(len(own))
    index = faiss.IndexFlatIP(own.shape[1])
    index.add(own[sample])
    found_sims, found = index.search(own, k + 1)
    itself = ids[sample][found] == ids[:, None]  # a star is not its own neighbour
    order = np.argsort(itself, axis=1, kind="stable")
    dk = 1.0 - np.take_along_axis(found_sims, order, axis=1)[:, k - 1]
    kept = np.clip((1.0 - sims) / np.maximum(dk, 1e-9)[:, None], 0.0, 1.0)
    closest = kept.argmin(axis=1)
    rows = np.arange(len(own))
    # a star like several marked stars is pushed by each: the evidence of marks accumulates
    return kept.prod(axis=1), closest, sims[rows, closest]


def _signatures(scores: pa.Table | None, ids: np.ndarray) -> np.ndarray | None:
    """The residual signatures of ``ids`` from score rows (NaN rows where a star has none)."""
    if scores is None or "signature" not in scores.column_names or scores.num_rows == 0:
        return None
    matrix = column_matrix(scores, "signature")
    at = {int(i): j for j, i in enumerate(scores.column("source_id").to_numpy())}
    out = np.full((len(ids), matrix.shape[1]), np.nan, np.float32)
    for row, source_id in enumerate(ids):
        if int(source_id) in at:
            out[row] = matrix[at[int(source_id)]]
    return out


def _latest_scores(st: Store, ids: np.ndarray) -> pa.Table | None:
    """The score rows of ``ids`` from the latest release that scored each."""
    parts = []
    for release in st.scored_releases():
        table = st.read_scores(release, columns=["source_id", "signature"])
        parts.append(table.filter(pc.is_in(table.column("source_id"), pa.array(ids, pa.int64()))))
    if not parts:
        return None
    table = pa.concat_tables(parts)
    _, last = np.unique(table.column("source_id").to_numpy()[::-1], return_index=True)
    return table.take(table.num_rows - 1 - last)


def more_like(store: str | os.PathLike | Store, release: str, k: int = 5) -> dict[int, pa.Table]:
    """For each star marked interesting: its k nearest unmarked stars of ``release`` (joint
    space where it has both spectra), with their scores."""
    st = Store.open(store)
    marks = latest_marks(st)
    interesting = marks.filter(pc.equal(marks.column("mark"), "interesting"))
    if interesting.num_rows == 0:
        return {}
    entry = st.score_entry(release)
    scores = st.read_scores(release) if entry else None
    ids = (
        scores.column("source_id").to_numpy()
        if scores is not None
        else st.read_shards(columns=["source_id"], release=release).column("source_id").to_numpy()
    )
    space, vectors = _space_vectors(st, ids, release)
    seeds = interesting.column("source_id").to_numpy()
    seed_space, seed_vectors = _space_vectors(st, seeds, None)
    marked = set(marks.column("source_id").to_pylist())
    out = {}
    for j, seed in enumerate(seeds):
        name = seed_space[j]
        if name not in vectors:
            continue
        rows = np.flatnonzero((space == name) & ~np.isin(ids, list(marked)))
        if not rows.size:
            continue
        sims = vectors[name][rows] @ seed_vectors[name][j]
        best = rows[np.argsort(-sims)[:k]]
        table = pa.table(
            {
                "source_id": pa.array(ids[best], pa.int64()),
                "similarity": pa.array(np.sort(-sims)[:k] * -1, pa.float32()),
            }
        )
        if scores is not None:
            table = table.join(
                scores.select(["source_id", "score", "rank", "driver", "modality_tag"]),
                "source_id",
                join_type="left outer",
            ).sort_by([("similarity", "descending")])
        out[int(seed)] = table
    return out
