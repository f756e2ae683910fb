"""The Python API: the library twin of every ``specsearch`` command, for notebooks and scripts.

    >>> import specsearch as ss
    >>> store = ss.open_store(demo_store)      # a store made by `specsearch demo` (or nightly)
    >>> store.releases()
    ['DR1', 'DR2']
    >>> top = store.scores("DR2", top=3)
    >>> len(top), top.table.column_names[:3]
    (3, ['source_id', 'release', 'score'])

Every method returns what the matching command prints: a ``Result`` (an Arrow table with
``to_pandas()``, ``to_astropy()`` and an HTML rendering in a notebook), a stage's result object,
or a DuckDB relation for SQL. ``store.search`` and ``store.show`` results draw themselves too
(``.plot("out.png")``, or inline in Jupyter). The commands call the same functions.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import SpecsearchError
from .store import Store

HTML_ROWS = 20
"""Rows a Result shows in a notebook (all rows stay in ``.table``)."""


class Result:
    """An Arrow table with conversions and a notebook rendering.

    >>> from specsearch.api import Result
    >>> r = Result(pa.table({"source_id": [1, 2], "score": [3.5, 1.0]}), "two stars")
    >>> len(r), r.to_pandas().score.tolist()
    (2, [3.5, 1.0])
    >>> "<table" in r._repr_html_()
    True
    """

    def __init__(self, table: pa.Table, title: str = ""):
        self.table = table
        self.title = title

    def __len__(self) -> int:
        return self.table.num_rows

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.title!r}: {self.table.num_rows} rows>"

    def to_arrow(self) -> pa.Table:
        return self.table

    def to_pandas(self):
        """The table as a pandas DataFrame."""
        return self.table.to_pandas()

    def to_astropy(self):
        """The table as an astropy Table (fixed-size list columns become 2-D columns)."""
        from astropy.table import Table

        columns = {}
        for name in self.table.column_names:
            column = self.table.column(name)
            if pa.types.is_fixed_size_list(column.type):
                from .schema import column_matrix

                columns[name] = column_matrix(self.table.select([name]), name)
            else:
                columns[name] = column.to_numpy(zero_copy_only=False)
        return Table(columns)

    def _repr_html_(self) -> str:
        shown = self.table.slice(0, HTML_ROWS)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in shown.column_names)
        rows = []
        for record in shown.to_pylist():
            cells = "".join(f"<td>{html.escape(_cell(v))}</td>" for v in record.values())
            rows.append(f"<tr>{cells}</tr>")
        more = (
            f"<p>{self.table.num_rows - HTML_ROWS:,} more rows in .table</p>"
            if self.table.num_rows > HTML_ROWS
            else ""
        )
        title = f"<p><b>{html.escape(self.title)}</b></p>" if self.title else ""
        return f"{title}<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


class FigureResult(Result):
    """A Result that also draws a figure (``figure()``, ``plot(path)``; inline in Jupyter)."""

    def figure(self):
        raise NotImplementedError

    def plot(self, path: str | os.PathLike | None = None):
        """Draw the figure; with ``path`` save it as PNG there and return the path."""
        from . import plots

        figure = self.figure()
        if path is None:
            return figure
        Path(path).write_bytes(plots.png(figure, dpi=110))
        return Path(path)

    def _repr_html_(self) -> str:
        import base64

        from . import plots

        image = base64.b64encode(plots.png(self.figure())).decode("ascii")
        return f'<img src="data:image/png;base64,{image}">' + super()._repr_html_()


class SearchResult(FigureResult):
    """Nearest neighbours: one row per (query, rank); the figure overlays the neighbours'
    spectra on the query's, in both modalities, with their similarities and labels."""

    def __init__(self, table: pa.Table, title: str, store: Store, query_rows: pa.Table | None):
        super().__init__(table, title)
        self._store = store
        self._query_rows = query_rows

    def figure(self):
        from . import plots
        from .query.stars import search_plot_data

        return plots.search_figure(*search_plot_data(self._store, self.table, self._query_rows))


class StarResult(FigureResult):
    """One star of a release: its score components as a table; the figure shows its observed,
    reconstructed and cross-predicted spectra with residuals and the component bars."""

    def __init__(self, view):
        from .pipeline.score import COMPONENTS

        score = view.score or {}
        table = pa.table(
            {
                "component": list(COMPONENTS),
                "value": [score.get(c) for c in COMPONENTS],
                "minus_log10_p": [score.get(f"{c}_logp") for c in COMPONENTS],
            }
        )
        super().__init__(table, f"source_id {view.source_id} ({view.release})")
        self.view = view

    def figure(self):
        from . import plots
        from .pipeline.score import COMPONENTS

        return plots.star_figure(self.view, COMPONENTS)

    def _repr_html_(self) -> str:
        score = self.view.score or {}
        text = html.escape(score.get("explanation") or "not scored")
        return f"<p>{text}</p>" + super()._repr_html_()


class SpecStore:
    """A specsearch store, opened for the Python API (``open_store``)."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        self.store = Store(self.path, create=create)

    def __repr__(self) -> str:
        return f"<SpecStore {self.path}: releases {', '.join(self.releases()) or 'none'}>"

    # --- the stages that write the store

    def ingest(self, source: str | os.PathLike, release: str, **options):
        """``specsearch ingest``: survey files or shards as release ``release``.

        >>> new = ss.create_store(tmp / "new")
        >>> new.ingest(sample / "release=DR2", "DR2").stars
        400
        """
        from .pipeline.ingest import ingest

        return ingest(source, self.store, release, show_progress=False, **options)

    def embed(self, release: str | None = None, **options):
        """``specsearch embed``: embeddings, reconstructions, predictions, labels.

        >>> ss.open_store(demo_store).embed().chunks  # the demo embedded everything already
        0
        """
        from .pipeline.embed import embed_store

        return embed_store(self.store, release=release, show_progress=False, **options)

    def build_indexes(self, modality: str = "all", **options):
        """``specsearch index build``: the FAISS indexes.

        >>> built = ss.open_store(demo_store).build_indexes(modality="xp")
        >>> built.modalities["xp"]["n"]
        2400
        """
        from .indexes import build_store_indexes

        with self.store.writing("index build"):
            return build_store_indexes(
                self.store, modality=modality, show_progress=False, **options
            )

    def score(self, release: str | None = None, reference: str | None = None, **options):
        """``specsearch score``: anomaly scores against the frozen reference.

        >>> ss.open_store(demo_store).score().skipped  # scored by the demo's nightly runs
        ['DR1', 'DR2']
        """
        from .pipeline.score import score_store

        return score_store(
            self.store, release=release, reference=reference, show_progress=False, **options
        )

    def report(self, release: str, out: str | os.PathLike, **options):
        """``specsearch report``: the HTML report and tables of the top anomalies.

        >>> written = ss.open_store(demo_store).report("DR2", tmp / "report", top=2, since="DR1")
        >>> written.html.exists(), written.shown
        (True, 2)
        """
        from .pipeline.report import write_report

        return write_report(self.store, release, out, show_progress=False, **options)

    def nightly(self, source: str | os.PathLike, release: str, **options):
        """``specsearch nightly``: ingest, embed, index, score and report one release.

        >>> night = ss.open_store(demo_store).nightly(sample / "release=DR2", "DR2", top=25)
        >>> night.changed  # the demo ran this very night already (with its --top of 25)
        []
        """
        from .pipeline.nightly import nightly

        return nightly(source, self.path, release, show_progress=False, **options)

    # --- what reads it

    def releases(self) -> list[str]:
        """The releases, oldest first.

        >>> ss.open_store(demo_store).releases()
        ['DR1', 'DR2']
        """
        return self.store.releases()

    def search(
        self,
        source_id: int | None = None,
        spectrum: str | os.PathLike | None = None,
        source_ids=None,
        modality: str = "xp",
        target: str | None = None,
        k: int = 10,
        model: str = "default",
    ) -> SearchResult:
        """``specsearch search``: the k nearest stars to a star, a spectrum file or many stars.

        >>> found = ss.open_store(demo_store).search(source_id=example_id, k=3)
        >>> found.table.column("rank").to_pylist()
        [1, 2, 3]
        >>> found.plot(tmp / "search.png").exists()
        True
        """
        from .query.search import search

        if sum(x is not None for x in (source_id, spectrum, source_ids)) != 1:
            raise SpecsearchError("give exactly one of source_id, spectrum or source_ids")
        ids = None if source_id is None else np.array([source_id], dtype=np.int64)
        if source_ids is not None:
            ids = np.asarray(source_ids, dtype=np.int64)
        table = search(
            self.store,
            source_ids=ids,
            spectrum=spectrum,
            modality=modality,
            target=target,
            k=k,
            model=model,
        )
        query_rows = None
        if spectrum is not None:
            from .surveys.sources import read_source

            query_rows = read_source(spectrum)[0]
        title = f"{k} nearest {(target or modality).upper()} neighbours"
        return SearchResult(table, title, self.store, query_rows)

    def sql(self, query: str, attach: dict | None = None, arrays: bool = False):
        """``specsearch sql``: a DuckDB relation over the store's views (and attached files).

        >>> rel = ss.open_store(demo_store).sql("SELECT count(*) AS n FROM shards")
        >>> rel.fetchall()
        [(2400,)]
        """
        from .query.sql import connect
        from .query.sql import query as run

        return run(connect(self.store, attach, with_arrays=arrays), query)

    def scores(self, release: str | None = None, top: int | None = None) -> Result:
        """Score rows of a release (default: the latest scored), strangest first after triage
        (``mark``), with ``adjusted_rank``; ``top`` keeps the first rows.

        >>> top = ss.open_store(demo_store).scores("DR2", top=5)
        >>> top.table.column("adjusted_rank").to_pylist()
        [1, 2, 3, 4, 5]
        """
        from .query.triage import triaged

        scored = self.store.scored_releases()
        if not scored:
            raise SpecsearchError(f"{self.path}: nothing scored yet; run score or nightly")
        release = release or scored[-1]
        table = triaged(self.store, release)
        if top is not None:
            table = table.slice(0, top)
        return Result(table, f"scores of {release}")

    def show(self, source_id: int, release: str | None = None) -> StarResult:
        """``specsearch show``: one star's spectra, predictions, residuals and components.

        >>> star = ss.open_store(demo_store).show(example_id)
        >>> star.table.column("component").to_pylist()[:2]
        ['recon_lrs', 'cross_lrs']
        >>> star.plot(tmp / "star.png").exists()
        True
        """
        from .query.stars import star_views

        release = release or self._release_of(source_id)
        return StarResult(star_views(self.store, release, np.array([source_id]))[0])

    def predict(self, release: str | None = None, model: str = "default") -> Result:
        """``specsearch predict --store``: labels with uncertainties for the current rows.

        >>> labels = ss.open_store(demo_store).predict(release="DR2")
        >>> len(labels), "teff_err" in labels.table.column_names
        (400, True)
        """
        from .query.predict import predict_store

        return Result(predict_store(self.store, release, model), "stellar labels")

    def translate(self, source_id: int, to: str, model: str = "default") -> Result:
        """``specsearch translate``: one star's predicted spectrum of the other kind.

        >>> len(ss.open_store(demo_store).translate(example_id, "xp"))  # 343 XP samples
        343
        """
        from .query.predict import rows_for, translate_rows

        return Result(translate_rows(rows_for(self.store, source_id), to, model), f"to {to}")

    def mark(
        self,
        source_ids,
        mark: str,
        note: str = "",
        user: str | None = None,
        release: str | None = None,
    ) -> int:
        """``specsearch mark``: mark stars boring, artefact or interesting (triage); returns
        the number of marks the store now holds. Scores never change; rankings do.

        >>> store = ss.open_store(demo_store)
        >>> store.mark([example_id], "boring", note="seen it")
        1
        >>> store.scores("DR2").to_pandas().set_index("source_id").loc[example_id, "triage"]
        'marked boring'
        """
        from .query.triage import mark as add

        return add(self.store, source_ids, mark, note=note, user=user, release=release)

    def marks(self) -> Result:
        """Every mark made, oldest first.

        >>> len(ss.open_store(demo_store).marks())
        0
        """
        return Result(self.store.read_marks(), "marks")

    def _release_of(self, source_id: int) -> str:
        """The release of a star's current row."""
        rows = self.store.read_shards(
            columns=["source_id", "release"], source_ids=np.array([source_id])
        )
        if rows.num_rows == 0:
            raise SpecsearchError(f"source_id {source_id} is not in {self.path}")
        return rows.column("release")[0].as_py()


def open_store(path: str | os.PathLike) -> SpecStore:
    """An existing store, for the Python API.

    >>> ss.open_store(demo_store)  # doctest: +ELLIPSIS
    <SpecStore ...: releases DR1, DR2>
    """
    return SpecStore(path, create=False)


def create_store(path: str | os.PathLike) -> SpecStore:
    """A new, empty store (or an existing one).

    >>> ss.create_store(tmp / "empty").releases()
    []
    """
    return SpecStore(path, create=True)


def predict(source: str | os.PathLike, model: str = "default") -> Result:
    """``specsearch predict FILE``: labels with uncertainties for the spectra in a file.

    >>> len(ss.predict(sample / "release=DR2" / "part-00000.parquet"))
    400
    """
    from .query.predict import predict_table
    from .surveys.sources import read_source

    return Result(predict_table(read_source(source)[0], model), "stellar labels")


def translate(source: str | os.PathLike, to: str, model: str = "default") -> Result:
    """``specsearch translate --spectrum FILE``: the predicted spectrum of the other kind.

    >>> pixels = ss.translate(sample / "release=DR2" / "part-00000.parquet", "lrs")
    >>> len(pixels) // 400  # 1462 LRS pixels per star
    1462
    """
    from .query.predict import translate_rows
    from .surveys.sources import read_source

    return Result(translate_rows(read_source(source)[0], to, model), f"to {to}")


def simulate(out: str | os.PathLike, n: int, seed: int = 0, **options):
    """``specsearch simulate``: a synthetic paired release with injected anomalies.

    >>> made = ss.simulate(tmp / "sim", n=50, seed=1, anomaly_fraction=0.16)
    >>> made.stars, made.classes["normal"]
    (50, 42)
    """
    from .sim.simulate import simulate_release

    return simulate_release(out, n=n, seed=seed, **options)


def demo(out: str | os.PathLike = "demo-out") -> Any:
    """``specsearch demo``: two nights of the bundled sample; returns the demo's result.

    >>> result = ss.demo(tmp / "demo")
    >>> sorted(result.nights), result.top.num_rows
    (['DR1', 'DR2'], 8)
    """
    from .pipeline.demo import run_demo

    return run_demo(Path(out))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not np.isfinite(value) else f"{value:.4g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return str(value)
