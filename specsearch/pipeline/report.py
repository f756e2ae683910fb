"""The report stage: one self-contained HTML page (images inline, no network) plus Parquet and
CSV of the top anomalies of a scored release.

``write_report(store, release, out)`` is the library twin of ``specsearch report``. The page
holds: a summary (stars scored, rejects by reason, the score histogram, counts per driving
component and modality tag, the stars newly above the threshold since ``since``, run metadata),
the top-N table, and per top star its observed and predicted spectra with residuals in sigma,
the flagged windows shaded and named, its three nearest neighbours, the component bars, its
catalog columns and predicted labels.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import SpecsearchError
from ..files import atomic_path, write_parquet_atomic
from ..progress import progress
from ..schema import LABELS
from ..store import Store
from .score import COMPONENTS, default_threshold

HTML_FILE = "report.html"
HEADLESS_CHROMIUM = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
"""Flags that let Chromium render a report offline, headless, without reaching the network
(what the browser test and the screenshots in docs/ use: ``chromium *HEADLESS_CHROMIUM ...``)."""
TABLE_FILE = "top_anomalies"
TOP = 50


@dataclass(frozen=True)
class ReportResult:
    """What a report holds and where it went."""

    release: str
    html: Path
    parquet: Path
    csv: Path
    stars: int
    shown: int
    above_threshold: int
    new_since: int | None
    since: str | None
    seconds: float

    def __str__(self) -> str:
        new = f", {self.new_since} new since {self.since}" if self.since else ""
        return (
            f"report {self.release}: top {self.shown} of {self.stars:,} stars "
            f"({self.above_threshold} above threshold{new}) -> {self.html}"
        )


def _scores(store: Store, release: str) -> pa.Table:
    entry = store.score_entry(release)
    if not entry:
        raise SpecsearchError(
            f"{store.root}: release {release} is not scored; run 'specsearch score --release {release}'"
        )
    return store.read_scores(release)


def new_above_threshold(store: Store, release: str, since: str, threshold: float) -> pa.Table:
    """Score rows of ``release`` at or above ``threshold`` whose star was not at or above it in
    ``since`` (absent from it, or below), strangest first."""
    now = _scores(store, release)
    before = _scores(store, since)
    flagged_before = before.filter(pc.greater_equal(before.column("score"), threshold))
    known = flagged_before.column("source_id").to_numpy()
    above = now.filter(pc.greater_equal(now.column("score"), threshold))
    fresh = ~np.isin(above.column("source_id").to_numpy(), known)
    return above.filter(pa.array(fresh)).sort_by("rank")


def top_table(store: Store, release: str, top: int) -> pa.Table:
    """The top anomalies after triage (``query.triage.triaged``: the users' marks push stars
    down; the stored scores are untouched): their score rows, their mark, adjusted score and
    rank and the reason, plus catalog columns and predicted labels."""
    from ..query.triage import triaged

    scores = triaged(store, release, _scores(store, release)).slice(0, top)
    scores = scores.drop_columns(["signature"])  # for triage; a table of numbers is kinder
    ids = scores.column("source_id").to_numpy()
    catalog = store.read_shards(
        columns=["source_id", "obsid", *LABELS], source_ids=ids, release=release
    )
    table = scores.join(catalog, "source_id", join_type="left outer")
    for modality in ("lrs", "xp"):
        try:
            emb = store.embeddings(
                modality,
                release=release,
                columns=["source_id", *(f"pred_{label}" for label in LABELS)],
                source_ids=ids,
            )
        except SpecsearchError:
            continue
        renamed = emb.drop_columns(["release"]).rename_columns(
            ["source_id", *(f"{modality}_pred_{label}" for label in LABELS)]
        )
        table = table.join(renamed, "source_id", join_type="left outer")
    return table.sort_by("adjusted_rank")


def write_report(
    store: str | os.PathLike | Store,
    release: str,
    out: str | os.PathLike,
    since: str | None = None,
    top: int = TOP,
    threshold: float | None = None,
    command: str | None = None,
    model: str | None = None,
    show_progress: bool = True,
) -> ReportResult:
    """Write ``out/report.html``, ``out/top_anomalies.parquet`` and ``.csv`` for ``release``.

    ``threshold``: the score that counts as an anomaly (default: ``score.default_threshold``
    of the release's size). ``model``: where to load the store's model from when its id is
    not installed (a directory).
    """
    from .. import plots
    from ..query.stars import star_views

    start = time.perf_counter()
    from ..query.triage import more_like

    st = Store.open(store)
    if top < 1:
        raise SpecsearchError(f"--top must be at least 1, not {top}")
    out = Path(out)
    scores = _scores(st, release)
    if threshold is None:
        threshold = default_threshold(scores.num_rows)
    if since is not None and since == release:
        raise SpecsearchError("--since must name an earlier release than --release")
    fresh = new_above_threshold(st, release, since, threshold) if since else None
    table = top_table(st, release, top)
    ids = table.column("source_id").to_numpy()
    values = scores.column("score").to_numpy(zero_copy_only=False)
    entry = st.score_entry(release)
    images: list[str] = []
    sections = []
    with progress("report", len(ids), show_progress, unit="stars") as advance:
        views = star_views(st, release, ids, model=model) if len(ids) else []
        for view in views:
            figure = plots.star_figure(view, COMPONENTS)
            sections.append(_star_section(view, _image(plots.png(figure), images)))
            advance(1)
    histogram = _image(
        plots.png(plots.score_histogram(values, threshold, f"release {release}")), images
    )
    above = scores.filter(pc.greater_equal(scores.column("score"), threshold))
    drivers = Counter(above.column("driver").to_pylist())
    tags = Counter(above.column("modality_tag").to_pylist())
    driver_png = (
        _image(
            plots.png(plots.count_bars(dict(drivers.most_common()), "driving component")), images
        )
        if drivers
        else ""
    )
    tag_png = (
        _image(plots.png(plots.count_bars(dict(tags.most_common()), "modality tag")), images)
        if tags
        else ""
    )
    rejects = Counter(st.rejects(release).column("reason").to_pylist())
    page = _page(
        _Page(
            st,
            release,
            scores,
            table,
            entry,
            threshold,
            since,
            fresh,
            rejects,
            command,
            sections,
            more_like(st, release),
        ),
        {"histogram": histogram, "drivers": driver_png, "tags": tag_png},
        {"drivers": drivers, "tags": tags},
    )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / HTML_FILE) as tmp:
        tmp.write_text(page, encoding="utf-8")
    write_parquet_atomic(table, out / f"{TABLE_FILE}.parquet")
    with atomic_path(out / f"{TABLE_FILE}.csv") as tmp:
        pacsv.write_csv(table, tmp)
    return ReportResult(
        release=release,
        html=out / HTML_FILE,
        parquet=out / f"{TABLE_FILE}.parquet",
        csv=out / f"{TABLE_FILE}.csv",
        stars=scores.num_rows,
        shown=table.num_rows,
        above_threshold=above.num_rows,
        new_since=None if fresh is None else fresh.num_rows,
        since=since,
        seconds=time.perf_counter() - start,
    )


# ------------------------------------------------------------------ the page


def _image(data: bytes, images: list[str]) -> str:
    images.append("x")
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="figure {len(images)}">'


def _esc(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not np.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _rows_html(table: pa.Table, columns: list[str], link: bool = False) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in table.select(columns).to_pylist():
        cells = []
        for c in columns:
            text = _esc(row[c])
            if link and c == "source_id":
                text = f'<a href="#star-{row[c]}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _counts_html(counts: Counter, what: str, none: str = "none") -> str:
    if not counts:
        return f"<p>{none}</p>"
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{v:,}</td></tr>" for k, v in counts.most_common()
    )
    return (
        f"<table><thead><tr><th>{what}</th><th>stars</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _star_section(view, image: str) -> str:
    score = view.score or {}
    catalog = {k: v for k, v in view.catalog.items() if k not in ("release",)}
    labels = []
    for label in LABELS:
        cells = [f"<td>{label}</td>", f"<td>{_esc(catalog.get(label))}</td>"]
        for modality in ("lrs", "xp"):
            pred = view.labels.get(modality, {})
            value, err = pred.get(label), pred.get(f"{label}_err")
            text = "" if value is None or not np.isfinite(value) else f"{value:.3g} ± {err:.2g}"
            cells.append(f"<td>{text}</td>")
        labels.append("<tr>" + "".join(cells) + "</tr>")
    label_table = (
        "<table><thead><tr><th>label</th><th>catalog</th><th>from LRS</th><th>from XP</th>"
        f"</tr></thead><tbody>{''.join(labels)}</tbody></table>"
    )
    extra = ", ".join(
        f"{html.escape(k)} {_esc(v)}"
        for k, v in catalog.items()
        if k not in ("source_id", *LABELS, *(f"{label}_err" for label in LABELS))
    )
    return (
        f'<section class="star" id="star-{view.source_id}">'
        f"<h3>#{score.get('rank', '')} source_id {view.source_id} "
        f'<span class="score">score {_esc(score.get("score"))}</span> '
        f'<span class="tag">{_esc(score.get("modality_tag"))}</span></h3>'
        f"<p>{_esc(score.get('explanation'))}</p>{image}"
        f'<div class="facts">{label_table}<p class="catalog">{extra}</p></div></section>'
    )


def _versions() -> str:
    import duckdb
    import faiss
    import pyarrow
    import torch

    from .. import __version__

    return (
        f"specsearch {__version__}, numpy {np.__version__}, pyarrow {pyarrow.__version__}, "
        f"torch {torch.__version__}, faiss {faiss.__version__}, duckdb {duckdb.__version__}, "
        f"Python {platform.python_version()}"
    )


@dataclass
class _Page:
    """What the page is written from."""

    store: Store
    release: str
    scores: pa.Table
    table: pa.Table
    entry: dict
    threshold: float
    since: str | None
    fresh: pa.Table | None
    rejects: Counter
    command: str | None
    sections: list[str]
    more_like: dict[int, pa.Table]


def _page(page: _Page, figures: dict[str, str], counts: dict[str, Counter]) -> str:
    st, release, scores, table, entry = (
        page.store,
        page.release,
        page.scores,
        page.table,
        page.entry,
    )
    threshold, since, fresh, rejects = page.threshold, page.since, page.fresh, page.rejects
    histogram, driver_png, tag_png = figures["histogram"], figures["drivers"], figures["tags"]
    drivers, tags, sections, command = (
        counts["drivers"],
        counts["tags"],
        page.sections,
        page.command,
    )
    columns = ["rank", "source_id", "score", "driver", "modality_tag", "windows"]
    # triage changed this page: a row carries a mark or a reason, or marks pushed stars out of it
    ranks = table.column("rank").to_pylist()
    marked = (
        table.filter(pc.is_valid(table.column("mark"))).num_rows > 0
        or any(table.column("triage").to_pylist())
        or (
            "adjusted_rank" in table.column_names
            and ranks != table.column("adjusted_rank").to_pylist()
        )
    )
    top_columns = (
        ["adjusted_rank", "rank", "source_id", "score", "adjusted_score", "mark", "triage"]
        + ["driver", "modality_tag", "windows"]
        if marked
        else columns
    )
    more_html = ""
    if page.more_like:
        parts = [
            f"<h3>Like {seed} (marked interesting)</h3>"
            + _rows_html(like, ["source_id", "similarity", "score", "rank", "driver"], link=True)
            for seed, like in page.more_like.items()
        ]
        more_html = (
            "<h2>More like this</h2><p>The nearest unmarked stars of this release to each star "
            "marked interesting.</p>" + "".join(parts)
        )
    new_html = ""
    if since:
        new_html = (
            f"<h2>New since {html.escape(since)}</h2><p>{fresh.num_rows} star(s) at or above "
            f"score {threshold:g} in {html.escape(release)} that were not in {html.escape(since)}."
            "</p>" + (_rows_html(fresh.slice(0, 200), columns, link=True) if fresh.num_rows else "")
        )
    above = int(np.nansum(scores.column("score").to_numpy(zero_copy_only=False) >= threshold))
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    run = command or " ".join(["specsearch", *sys.argv[1:]])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>specsearch anomaly report: {html.escape(release)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ccc; margin-top: 1.6em; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
.summary {{ display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }}
.star {{ border-top: 1px solid #eee; padding-top: 0.5em; }}
.score {{ color: #b22; }} .tag {{ color: #555; font-size: 0.8em; }}
.facts {{ display: flex; gap: 1em; align-items: flex-start; }} .catalog {{ font-size: 0.8em; }}
.meta {{ font-size: 0.8em; color: #555; }} img {{ max-width: 100%; }}
</style></head>
<body>
<h1>Anomaly report: release {html.escape(release)}</h1>
<p class="meta">store {html.escape(str(st.root))}; model {html.escape(entry["model_id"])};
calibrated on release {html.escape(entry["reference"])}; scored {html.escape(entry["scored"])};
report written {created}<br>{html.escape(_versions())}<br>command: <code>{
        html.escape(run)
    }</code></p>
<h2>Summary</h2>
<p><b>{scores.num_rows:,}</b> stars scored; <b>{above:,}</b> at or above score
{threshold:g} (p &lt; 10<sup>-{threshold:g}</sup> against the reference release; at that
threshold about {scores.num_rows * 10**-threshold:.1f} normal star(s) would pass by chance; the
default threshold is log10 of the release's size, where that is about one).
Rejected at ingest: {sum(rejects.values()):,}.</p>
<div class="summary"><div>{histogram}</div>
<div>{driver_png}{_counts_html(drivers, "driving component")}</div>
<div>{tag_png}{_counts_html(tags, "modality tag")}</div>
<div><h3>Rejects by reason</h3>{_counts_html(rejects, "reason", "No rejects.")}</div></div>
<p class="meta">Modality tags: <b>lrs_only</b> / <b>xp_only</b>: only one spectrum is unusual,
more often instrumental; <b>both</b>: both spectra are unusual, more often astrophysical;
<b>pair</b>: each spectrum looks normal but they disagree (a mismatched pair, or a companion).</p>
{new_html}
<h2>Top {table.num_rows} anomalies</h2>
{
        "<p class='meta'>Ranked after triage: stars marked boring or artefact, and the stars like "
        "them, are pushed down (the reason is in <b>triage</b>); the stored scores are unchanged.</p>"
        if marked
        else ""
    }
{_rows_html(table, top_columns, link=True)}
{more_html}
<p class="meta">Also in <code>{TABLE_FILE}.parquet</code> and <code>{TABLE_FILE}.csv</code> beside
this page, with every component and the catalog and predicted labels.</p>
<h2>The stars</h2>
<p class="meta">Top: observed flux (black), its reconstruction (blue) and the prediction from the
other spectrum (orange), the three nearest neighbours thin behind; shaded: the windows with the
largest residuals, named by the nearest strong feature. Bottom: residuals in sigma (noise plus the
model-error floor); grey band: ±3 sigma. Right: each component's -log10 p against the reference.</p>
{"".join(sections)}
<script>
window.addEventListener("load", function () {{
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {{
    if (images[i].complete && images[i].naturalWidth > 0) loaded++;
  }}
  document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
}});
</script>
</body></html>
"""
