"""``specsearch check``: verify every file of a store, and with ``repair`` make the derived ones
again.

The check reads every file the manifest lists and compares its SHA-256 and size with the
manifest's record; it lists files that no entry names (orphans, e.g. of a killed run), indexes
built on other embeddings than the store's (stale), and releases not fully embedded.

``repair`` holds the store's writer lock and:

1. rebuilds the manifest from the files when it is missing or damaged (``Store.rebuild_manifest``);
2. deletes orphans and damaged derived files (embeddings, calibration, scores, indexes);
3. runs the stages again over what is missing: ``embed`` (the chunks whose files went), the
   indexes that existed or are stale, ``score`` (with the frozen calibration when it is intact,
   else calibrating again on the same reference release);
4. checks again. What it cannot make again is the data itself (shards, rejects, marks): those
   are listed with the command that restores them, and the check fails.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EnvironmentFault, SpecsearchError
from ..progress import progress
from ..schema import MODALITIES
from ..store import MANIFEST, Problem, Store, remove_paths


@dataclass
class CheckResult:
    """What a check found (``problems``), what ``repair`` did (``repaired``) and what is still
    wrong (``left``: every problem without repair). Work not yet done (``Problem.to_do``: a
    release not embedded, an index older than the embeddings) is listed but is no damage."""

    store: Path
    files: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    left: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def damage(self) -> list[Problem]:
        return [p for p in self.left if not p.to_do]

    @property
    def to_do(self) -> list[Problem]:
        return [p for p in self.left if p.to_do]

    def __str__(self) -> str:
        lines = [f"repaired: {line}" for line in self.repaired]
        for problem in self.damage:
            lines.append(f"{problem}; {_remedy(problem, self.store)}")
        for problem in self.to_do:
            lines.append(f"to do: {problem}; {_remedy(problem, self.store)}")
        if self.ok:
            lines.append(
                f"check: {self.store}: {self.files} files verified, "
                + ("all repaired" if self.repaired else "all intact")
                + f" ({self.seconds:.1f} s)"
            )
        else:
            lines.append(
                f"check: {self.store}: {len(self.damage)} problem(s) in {self.files} files verified"
            )
        return "\n".join(lines)


def _remedy(problem: Problem, root: Path) -> str:
    if problem.part in ("shards", "rejects"):
        return (
            f"ingest the release's files again: 'specsearch ingest SOURCE --store {root} "
            f"--release {problem.release} --replace'"
        )
    if problem.part == "marks":
        return "restore marks/marks.parquet from a backup, or 'specsearch mark --import' it"
    if problem.to_do and problem.part == "embeddings":
        return f"'specsearch embed --store {root}' embeds what is missing"
    if problem.to_do and problem.part == "index":
        return f"'specsearch index build --store {root}' brings it up to date"
    if problem.part == "report":
        return f"write it again: 'specsearch report --store {root} --release {problem.release}'"
    return f"'specsearch check --store {root} --repair' makes it again"


def check_store(
    store: str | os.PathLike | Store, repair: bool = False, show_progress: bool = True
) -> CheckResult:
    """Verify every file of ``store``; with ``repair`` make the derived ones again (see the
    module doc). The result's ``ok`` says whether the store is now whole."""
    start = time.perf_counter()
    root = store.root if isinstance(store, Store) else Path(store)
    if not (root / MANIFEST).exists() and not (root / "shards").is_dir():
        raise SpecsearchError(f"{root}: not a specsearch store")
    st = Store.at(root)
    result = CheckResult(store=root)
    if not repair:
        result.problems, result.files = _audit(st, show_progress)
        result.left = list(result.problems)
    else:
        with st.writing("check --repair"):
            _repair(st, result, show_progress)
    result.seconds = time.perf_counter() - start
    return result


def _audit(st: Store, show_progress: bool) -> tuple[list[Problem], int]:
    try:
        st.read_manifest()
    except EnvironmentFault as err:
        return [Problem("damaged", "manifest", st.manifest_path, str(err).split(" (")[0])], 0
    total = sum(p.stat().st_size for p in st.root.rglob("*") if p.is_file())
    with progress("check", total, show_progress, unit="bytes") as advance:
        return st.audit(on_file=advance)


def _repair(st: Store, result: CheckResult, show_progress: bool) -> None:
    from ..indexes.store_indexes import build_store_indexes
    from .embed import embed_store
    from .score import score_store

    indexed, scored = set(), False
    try:
        manifest = st.read_manifest()
    except EnvironmentFault:
        # what the lost manifest had made: indexes and scores are made again (the old files
        # are orphans of the new manifest, removed below)
        indexed = {m for m in MODALITIES if (st.index_dir() / f"{m}.faiss").exists()}
        scored = any((st.root / "scores").glob("release=*"))
        manifest = st.rebuild_manifest()
        result.repaired.append(
            f"manifest rebuilt from the files ({len(manifest['releases'])} releases); "
            "embeddings recorded again, indexes and scores made again"
        )
    problems, result.files = _audit(st, show_progress)
    result.problems = problems
    manifest = st.read_manifest()
    indexed |= set(manifest.get("indexes", {}))
    calibration = manifest.get("calibration") or {}
    reference = calibration.get("release")
    scored = scored or bool(manifest.get("scores")) or reference is not None
    orphans: dict[Path, int] = {}
    for problem in problems:
        if problem.kind == "orphan" and problem.part == "embeddings":
            continue  # the embed stage below keeps the chunks it can use and deletes the rest
        if problem.kind == "orphan":
            remove_paths([problem.path])
            orphans[problem.path.parent] = orphans.get(problem.path.parent, 0) + 1
        elif problem.part == "embeddings" and problem.kind in ("damaged", "missing"):
            remove_paths([problem.path])
            result.repaired.append(f"embedded again: {problem.path}")
        elif problem.part == "calibration":
            st.drop_scores()
            result.repaired.append(
                f"calibrated again on {reference}: {problem.path} was {problem.kind}"
            )
        elif problem.part == "scores" and problem.kind in ("damaged", "missing"):
            st.forget("scores", problem.release)
            result.repaired.append(
                f"scored {problem.release} again: {problem.path} was {problem.kind}"
            )
        elif problem.part == "index":
            indexed.add(problem.modality)
            st.forget("indexes", problem.modality)
            result.repaired.append(f"rebuilt the {problem.modality} index: it was {problem.kind}")
    for folder, count in orphans.items():
        result.repaired.append(f"removed {count} orphaned file(s) in {folder}")

    def rebuild_index(modality: str) -> None:
        try:
            st.check_index(modality)  # intact and covering the embeddings: kept
        except SpecsearchError:
            build_store_indexes(st, modality=modality, show_progress=show_progress)

    model = st.embeddings_model() or _model_of_files(st)
    stages: list[tuple[str, object]] = []
    if model is not None:
        stages.append(("embed", lambda: embed_store(st, model=model, show_progress=show_progress)))
        for modality in sorted(indexed):
            stages.append((f"index {modality}", lambda m=modality: rebuild_index(m)))
        if scored:
            ref = reference if reference in st.releases() else None
            stages.append(
                ("score", lambda: score_store(st, reference=ref, show_progress=show_progress))
            )
    for name, run in stages:
        try:
            run()
        except SpecsearchError as err:  # a damaged shard stops a stage: it is listed below
            result.repaired.append(f"{name} could not run: {str(err).splitlines()[0]}")
    result.left, result.files = st.audit()


def _model_of_files(st: Store) -> str | None:
    """The model id in the embedding files' metadata (after the manifest was rebuilt)."""
    import pyarrow.parquet as pq

    for path in sorted((st.root / "embeddings").rglob("part-*.parquet")):
        try:
            metadata = pq.read_schema(path).metadata or {}
        except (OSError, ValueError):
            continue
        if b"specsearch.model_id" in metadata:
            return metadata[b"specsearch.model_id"].decode()
    return None
