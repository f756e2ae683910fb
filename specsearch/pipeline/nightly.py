"""The nightly run: a new data release in, its anomaly report out, in one idempotent command.

``nightly(source, store, release)`` is the library twin of ``specsearch nightly``:

1. ingest ``source`` as ``release`` (skipped when the release was ingested from the same files:
   same names, sizes and modification times; other files under an existing release name are an
   error, so a night is never silently replaced);
2. embed what is new (the release's chunks not yet embedded);
3. extend the FAISS indexes with the release (built the first time);
4. score the release against the frozen reference (the first release scored, or ``reference``);
5. write the report into ``STORE/reports/release=R/`` (new anomalies since the previous scored
   release).

Each stage does nothing when its inputs have not changed, so the same night run twice leaves
every file of the store byte-identical, and the result says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SpecsearchError
from ..schema import check_release
from ..store import Store
from .embed import embed_store
from .ingest import ingest, source_fingerprint
from .report import TOP, write_report
from .score import default_threshold, score_store


@dataclass
class NightlyResult:
    """Each stage's result (None: skipped, nothing changed) and the run's summary."""

    release: str
    store: Path
    stages: dict[str, Any] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    report: Path | None = None
    stars: int = 0
    above_threshold: int = 0
    new_since: int | None = None
    since: str | None = None
    top: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.changed:
            return (
                f"nightly {self.release}: nothing changed (already ingested, embedded, indexed, "
                f"scored and reported); report at {self.report}"
            )
        new = f", {self.new_since} new since {self.since}" if self.since else ""
        return (
            f"nightly {self.release}: {self.stars:,} stars, {self.above_threshold} anomalies "
            f"above threshold{new}; ran {', '.join(self.changed)} in {self.seconds:.1f} s; "
            f"report at {self.report}"
        )

    def to_json(self) -> str:
        """A machine-readable summary for cron and monitoring."""
        return json.dumps(
            {
                "status": "ok",
                "release": self.release,
                "store": str(self.store),
                "changed": self.changed,
                "stages": {k: (str(v) if v is not None else None) for k, v in self.stages.items()},
                "stars": self.stars,
                "above_threshold": self.above_threshold,
                "new_since": self.new_since,
                "since": self.since,
                "report": str(self.report) if self.report else None,
                "top": self.top,
                "seconds": round(self.seconds, 2),
                "metrics": self.metrics,
            },
            default=str,
        )


def nightly(
    source: str | os.PathLike,
    store: str | os.PathLike,
    release: str,
    *,
    reference: str | None = None,
    model: str = "default",
    top: int = TOP,
    threshold: float | None = None,
    workers: int | None = None,
    show_progress: bool = True,
) -> NightlyResult:
    """Ingest, embed, index, score and report one release (see the module doc)."""
    start = time.perf_counter()
    check_release(release)
    source = Path(source)
    if not source.exists():
        raise SpecsearchError(f"{source}: no such file or directory")
    root = Path(store)
    with contextlib.ExitStack() as held:  # one writer from the first stage to the last
        if (root / "manifest.json").exists():
            held.enter_context(Store(root).writing(f"nightly {release}"))
        result = _run(
            held, source, root, release, reference, model, top, threshold, workers, show_progress
        )
    result.seconds = time.perf_counter() - start
    return result


def _reset_peak_rss() -> None:
    """Start this process's peak-memory count afresh (Linux: 5 into /proc/self/clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB since the last reset (Linux: VmHWM); None
    where /proc does not tell."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


@contextlib.contextmanager
def _metered(result: NightlyResult, stage: str):
    """Record a stage's start (Unix time), wall seconds and this process's peak RSS in MB (worker
    processes, such as ingest's, are not counted here) into ``result.metrics``."""
    _reset_peak_rss()
    started, t0 = time.time(), time.perf_counter()
    try:
        yield
    finally:
        result.metrics[stage] = {
            "started": round(started, 3),
            "seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_mb": _peak_rss_mb(),
        }


def _run(held, source, root, release, reference, model, top, threshold, workers, show_progress):
    result = NightlyResult(release=release, store=root)
    # 1. ingest, unless these very files were already ingested as this release
    fingerprint = source_fingerprint(source)
    entry = Store(root).release_entry(release) if (root / "manifest.json").exists() else None
    if entry is None:
        with _metered(result, "ingest"):
            result.stages["ingest"] = ingest(
                source, root, release, workers=workers, show_progress=show_progress
            )
        result.changed.append("ingest")
    elif entry.get("source_fingerprint") != fingerprint:
        raise SpecsearchError(
            f"release {release} is already in {root} from other files "
            f"({', '.join(entry.get('sources', [])) or 'unknown'}); name the new night differently"
        )
    st = Store.open(root)
    held.enter_context(st.writing(f"nightly {release}"))  # re-entrant; a first night: from here
    # 2. embed what is new
    with _metered(result, "embed"):
        embedded = embed_store(st, release=release, model=model, show_progress=show_progress)
    if embedded.chunks:
        result.stages["embed"] = embedded
        result.changed.append("embed")
    # 3. the indexes hold the release
    with _metered(result, "index"):
        indexed = _index(st, release, show_progress)
    if indexed is not None:
        result.stages["index"] = indexed
        result.changed.append("index")
    # 4. score against the frozen reference
    with _metered(result, "score"):
        scored = score_store(
            st,
            release=release,
            reference=reference,
            model=model,
            threshold=threshold,
            show_progress=show_progress,
        )
    if scored.releases:
        result.stages["score"] = scored
        result.changed.append("score")
    # 5. the report, new since the previous scored release
    result.since = _previous_scored(st, release)
    if threshold is None:
        threshold = default_threshold((st.score_entry(release) or {}).get("stars", 0))
    out = st.report_dir(release)
    key = _report_key(st, release, result.since, top, threshold)
    recorded = st.report_entry(release)
    if recorded is None or recorded.get("key") != key or not (out / "report.html").exists():
        with _metered(result, "report"):
            report = _write_report(
                st, release, out, result.since, top, threshold, source, root, model, show_progress
            )
        st.record_report(
            release,
            {
                "key": key,
                "files": [p.name for p in (report.html, report.parquet, report.csv)],
                "since": result.since,
            },
        )
        result.stages["report"] = report
        result.changed.append("report")
    result.report = out / "report.html"
    score_entry = st.score_entry(release) or {}
    result.stars = score_entry.get("stars", 0)
    result.above_threshold = score_entry.get("above_threshold", 0)
    if result.since:
        from .report import new_above_threshold

        result.new_since = new_above_threshold(st, release, result.since, threshold).num_rows
    result.top = _top(st, release, min(top, 10))
    return result


def _write_report(st, release, out, since, top, threshold, source, root, model, show_progress):
    return write_report(
        st,
        release,
        out,
        since=since,
        top=top,
        threshold=threshold,
        command=f"specsearch nightly {source} --store {root} --release {release}",
        model=model,
        show_progress=show_progress,
    )


def _index(st: Store, release: str, show_progress: bool):
    """Extend the indexes with the release (build them the first time); None: nothing to do."""
    from ..indexes import build_store_indexes, extend_store_indexes

    recorded = st.read_manifest().get("indexes", {})
    modalities = st.embedding_modalities()
    if not all(m in recorded for m in modalities):
        return build_store_indexes(st, show_progress=show_progress)
    if all(release in recorded[m].get("releases", []) for m in modalities):
        return None
    return extend_store_indexes(st, release, show_progress=show_progress)


def _previous_scored(st: Store, release: str) -> str | None:
    releases = st.releases()
    earlier = releases[: releases.index(release)]
    scored = [r for r in earlier if st.score_entry(r)]
    return scored[-1] if scored else None


def _report_key(st: Store, release: str, since: str | None, top: int, threshold: float) -> str:
    """What a report is made from: the scores of the release (and of ``since``) and the options."""
    parts = {
        "scores": (st.score_entry(release) or {}).get("fingerprint"),
        "since": since,
        "since_scores": (st.score_entry(since) or {}).get("fingerprint") if since else None,
        "top": top,
        "threshold": threshold,
        "marks": st.read_manifest().get("marks"),  # new marks re-rank the report
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _top(st: Store, release: str, n: int) -> list[dict]:
    table = st.read_scores(
        release, columns=["source_id", "rank", "score", "driver", "modality_tag", "explanation"]
    )
    return [] if table is None else table.sort_by("rank").slice(0, n).to_pylist()
