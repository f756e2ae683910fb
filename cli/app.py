"""The `specsearch` command line: thin Typer commands over the library.

Each command calls one library function (its twin in the Python API), prints what it returned
and nothing else. Every command turns a SpecsearchError (bad input, missing store, unknown id)
into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer

from specsearch.errors import NotBuiltError, SpecsearchError, describe

# astropy says in warnings what it repairs or ignores in a damaged FITS or VOTable file; the
# readers' own one-line errors and reject reasons say what matters to the user
warnings.filterwarnings("ignore", module=r"astropy(\.|$)")
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"numpy\.ma(\.|$)")

app = typer.Typer(
    name="specsearch",
    help="Vector search and anomaly detection for stellar spectra (LAMOST LRS + Gaia XP).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="FAISS indexes over the store's embeddings.", no_args_is_help=True)
train_app = typer.Typer(help="The SpecCLIP training stages.", no_args_is_help=True)
models_app = typer.Typer(help="Installed and shipped models.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(train_app, name="train")
release_app = typer.Typer(help="The store's releases: list and remove.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(release_app, name="release")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def one_line_errors(func):
    """Map every error to one line on stderr: exit 2 for bad input, 1 for the environment (a
    full disk, a missing permission, a damaged or busy store), 130 when interrupted."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except (Exception, KeyboardInterrupt) as err:
            code, message = describe(err)
            if code == 130:
                typer.echo(message, err=True)
                raise typer.Exit(130) from None
            fail(message, code)

    return wrapper


class _RefusePandas:
    """An import finder that answers 'no pandas' (see ``without_pandas``)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pandas":
            raise ImportError("pandas is not used by this command")
        return None


def without_pandas(func):
    """Run a command with pandas unimportable. pyarrow imports pandas, if it can, on its first
    conversion to numpy (0.3-1 s: more than all the rest of a search by id); it takes an
    ImportError as 'no pandas'. For commands that use no pandas (search, sql)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if "pandas" in sys.modules:
            return func(*args, **kwargs)
        sys.meta_path.insert(0, _RefusePandas)
        try:
            return func(*args, **kwargs)
        finally:
            sys.meta_path.remove(_RefusePandas)

    return wrapper


def not_built(command: str, issue: str) -> None:
    raise NotBuiltError(f"'specsearch {command}' is not built yet ({issue})")


def emit(
    data,
    fmt: str | None,
    output: Path | None,
    title: str | None = None,
    summary: bool = True,
    store: Path | None = None,
):
    """Print a result (Arrow table or DuckDB relation) to stdout, or write it to ``output``
    (never inside ``store``; the format from its suffix unless given), followed by a one-line
    row count (on stderr when csv/json data went to stdout)."""
    import pyarrow as pa

    from specsearch.query.output import emit_relation, emit_table, output_format, rows_summary

    fmt = output_format(fmt, output, store)
    writer = emit_table if isinstance(data, pa.Table) else emit_relation
    rows = writer(data, fmt, output, title=title, stream=sys.stdout)
    if not summary:
        return
    text = rows_summary(rows, output, fmt)
    to_stderr = output is None and fmt != "table"
    typer.echo(text, err=to_stderr)


StoreOpt = Annotated[Path, typer.Option("--store", help="Store directory.")]
ReleaseOpt = Annotated[str | None, typer.Option("--release", help="Data-release name.")]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="table, csv, json or parquet (default: from the suffix of --output, else table).",
    ),
]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write results here.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Model id or directory.")]


@app.command()
@one_line_errors
def demo(out: Annotated[Path, typer.Option(help="Output directory.")] = Path("demo-out")) -> None:
    """The main job on the bundled sample: ingest, embed, index, score, report, search, SQL."""
    from rich.console import Console

    from specsearch.pipeline.demo import run_demo

    console = Console()
    run_demo(out, show=lambda item: console.print(item, markup=False, highlight=False))


@app.command()
@one_line_errors
def simulate(
    out: Annotated[Path, typer.Option(help="Output directory for the release.")],
    n: Annotated[int, typer.Option(help="Number of stars.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed; the output is a function of it.")] = 0,
    release: Annotated[str, typer.Option(help="Release name written into the rows.")] = "SIM",
    anomaly_fraction: Annotated[float, typer.Option(help="Fraction of injected anomalies.")] = 0.02,
    real_xp_fraction: Annotated[
        float, typer.Option(help="Fraction of stars that are real Gaia XP stars (simulated LRS).")
    ] = 0.0,
    real_xp_split: Annotated[
        str | None, typer.Option(help="Split of those real stars: train, val, test or train+val.")
    ] = None,
    as_files: Annotated[
        bool,
        typer.Option(
            "--as-files",
            help="Write LAMOST LRS FITS files (both layouts) and Gaia XP_SAMPLED products under "
            "OUT/files/release=R/ instead of shards; ingest gives the same rows.",
        ),
    ] = False,
) -> None:
    """Write a synthetic paired LRS + XP release as canonical shards (or as the surveys' files)
    plus truth.parquet."""
    from specsearch.sim.simulate import simulate_release

    result = simulate_release(
        out,
        n=n,
        seed=seed,
        release=release,
        anomaly_fraction=anomaly_fraction,
        real_xp_fraction=real_xp_fraction,
        real_xp_split=real_xp_split,
        show_progress=True,
        as_files=as_files,
    )
    typer.echo(result)


@app.command()
@one_line_errors
def ingest(
    source: Annotated[Path, typer.Argument(help="A file or folder of survey files or shards.")],
    store: StoreOpt,
    release: Annotated[str, typer.Option(help="Data-release name, e.g. DR1.")],
    workers: Annotated[
        int | None,
        typer.Option(
            help="Processes reading LAMOST and Gaia XP files (default: one per core).", min=1
        ),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Replace a release already in the store (its embeddings, scores and report go "
            "with it).",
        ),
    ] = False,
) -> None:
    """Raw survey files (LAMOST FITS, Gaia XP products) or shards into canonical shards."""
    from specsearch.pipeline.ingest import ingest as ingest_files

    typer.echo(ingest_files(source, store, release, workers=workers, replace=replace))


@release_app.command("list")
@one_line_errors
def release_list(store: StoreOpt) -> None:
    """The store's releases, oldest first: stars, rejects, and what is derived from each."""
    from specsearch.store import Store

    st = Store.open(store)
    manifest = st.read_manifest()
    embedded = manifest.get("embeddings", {}).get("releases", {})
    missing = st.missing_embeddings()
    releases = st.releases()
    if not releases:
        typer.echo(f"{st.root}: no releases yet")
        return
    width = max(7, *(len(name) for name in releases))
    typer.echo(f"{'release':<{width}}  {'stars':>10}  {'rejected':>8}  {'ingested (UTC)':<16}  has")
    for name in releases:
        entry = manifest["releases"][name]
        parts = []
        if name in embedded and name not in missing:
            parts.append("embeddings")
        elif name in embedded:
            parts.append("some embeddings")
        if name in manifest.get("scores", {}):
            parts.append("scores")
        if name == manifest.get("calibration", {}).get("release"):
            parts.append("calibration")
        if name in manifest.get("reports", {}):
            parts.append("report")
        ingested = str(entry.get("ingested") or "")[:16].replace("T", " ")
        typer.echo(
            f"{name:<{width}}  {entry['rows']:>10,}  {entry['rejects']:>8,}  {ingested:<16}  "
            + (", ".join(parts) or "-")
        )


@release_app.command("rm")
@one_line_errors
def release_rm(
    release: Annotated[str, typer.Argument(help="The release to remove.")],
    store: StoreOpt,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a release and everything derived from it (embeddings, scores, report; the
    calibration and every score when it was the reference), in one commit."""
    from specsearch.store import Store

    st = Store.open(store)
    if st.release_entry(release) is None:
        fail(f"{st.root}: release {release} is not in the store")
    if not yes:
        if not sys.stdin.isatty():
            fail(f"removing release {release} needs --yes when not run from a terminal")
        typer.confirm(f"Remove release {release} and everything derived from it?", abort=True)
    removed = st.remove_release(release)
    typer.echo(
        f"removed release {release} ({len(removed)} folders); indexes that held it are stale: "
        f"run 'specsearch index build --store {st.root}'"
    )


@app.command()
def check(
    store: StoreOpt,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Make again what is derived (embeddings, indexes, scores)."),
    ] = False,
) -> None:
    """Verify every file of the store against its checksum; list damaged, missing and orphaned
    files. Exit 0 when the store is whole, 1 when it is not, 2 for bad input."""
    from specsearch.pipeline.check import check_store

    try:
        result = check_store(store, repair=repair)
    except (Exception, KeyboardInterrupt) as err:
        code, message = describe(err)
        fail(message, code)
    typer.echo(result)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
@one_line_errors
def embed(
    store: StoreOpt,
    release: ReleaseOpt = None,
    model: ModelOpt = "default",
    engine: Annotated[str, typer.Option(help="local or ray.")] = "local",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    ray_address: Annotated[
        str | None, typer.Option(help="Address of an existing Ray cluster.")
    ] = None,
) -> None:
    """Embeddings, reconstructions and cross-predictions into Parquet."""
    from specsearch.pipeline.embed import embed_store

    typer.echo(
        embed_store(
            store,
            release=release,
            model=model,
            engine=engine,
            device=device,
            ray_address=ray_address,
        )
    )


@index_app.command("build")
@one_line_errors
def index_build(
    store: StoreOpt,
    modality: Annotated[str, typer.Option(help="lrs, xp or all.")] = "all",
    factory: Annotated[str, typer.Option(help="auto or a FAISS factory string.")] = "auto",
    target_recall: Annotated[
        float | None, typer.Option(help="Target recall@10 for auto tuning (default 0.95).")
    ] = None,
    memory_budget: Annotated[
        float | None,
        typer.Option(help="Most memory the index may take, in GB (default: half of RAM)."),
    ] = None,
    speed_for: Annotated[
        str,
        typer.Option(help="auto picks the fastest index for: single (one query) or batch."),
    ] = "single",
    sharded: Annotated[
        bool,
        typer.Option(
            "--sharded",
            help="Train on a sample, add shard by shard, merge the lists on disk (automatic "
            "when the index would not fit the memory budget).",
        ),
    ] = False,
    workers: Annotated[
        int, typer.Option(help="Processes adding shards at once (a sharded build).")
    ] = 1,
) -> None:
    """Build FAISS indexes over the store's embeddings."""
    from specsearch.indexes import DEFAULT_TARGET_RECALL, build_store_indexes
    from specsearch.store import Store

    recall = DEFAULT_TARGET_RECALL if target_recall is None else target_recall
    budget = None if memory_budget is None else int(memory_budget * 1e9)
    with Store.open(store).writing("index build") as opened:
        result = build_store_indexes(
            opened,
            modality=modality,
            factory=factory,
            target_recall=recall,
            memory_budget_bytes=budget,
            speed_for=speed_for,
            sharded=sharded,
            workers=workers,
        )
    typer.echo(result)


@app.command()
@one_line_errors
@without_pandas
def search(
    store: StoreOpt,
    source_id: Annotated[
        int | None, typer.Option("--source-id", help="Gaia source_id of the query.")
    ] = None,
    spectrum: Annotated[Path | None, typer.Option(help="A spectrum file as query.")] = None,
    ids_file: Annotated[
        Path | None, typer.Option("--ids", help="File of source_ids (batch mode).")
    ] = None,
    modality: Annotated[str, typer.Option(help="Modality of the query: lrs or xp.")] = "xp",
    target: Annotated[
        str | None, typer.Option(help="Modality of the results (default: same).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Number of neighbours.")] = 10,
    format: FormatOpt = None,
    output: OutputOpt = None,
    model: Annotated[str, typer.Option(help="Model id, to encode a --spectrum query.")] = "default",
    plot: Annotated[
        Path | None,
        typer.Option(help="Also draw the query with its neighbours overlaid into this PNG."),
    ] = None,
) -> None:
    """The k nearest neighbours of a star, in-modal or cross-modal."""
    import numpy as np

    from specsearch.query.search import read_id_file
    from specsearch.query.search import search as search_store
    from specsearch.schema import LABELS

    if sum(x is not None for x in (source_id, spectrum, ids_file)) != 1:
        raise SpecsearchError("give exactly one of --source-id, --ids or --spectrum")
    start = time.perf_counter()
    ids = None
    if source_id is not None:
        ids = np.array([source_id], dtype=np.int64)
    elif ids_file is not None:
        ids = read_id_file(ids_file)
    table = search_store(
        store, source_ids=ids, spectrum=spectrum, modality=modality, target=target, k=k, model=model
    )
    elapsed = time.perf_counter() - start
    if plot is not None:
        from specsearch.api import SearchResult
        from specsearch.store import Store
        from specsearch.surveys.sources import read_source

        query_rows = read_source(spectrum)[0] if spectrum is not None else None
        SearchResult(table, "", Store.open(store), query_rows).plot(plot)
    target = target or modality
    title = (
        f"{k} nearest {target.upper()} neighbours of a {modality.upper()} query "
        f"({elapsed * 1000:.0f} ms)"
    )
    if format in (None, "table") and output is None:  # the screen gets what a reader scans
        shown = ["rank", "neighbor_id", "similarity", "release", *LABELS]
        if len(np.unique(table.column("query_id").to_numpy())) > 1:
            shown.insert(0, "query_id")
        table = table.select(shown)
    emit(table, format, output, title=title, summary=False, store=store)
    if plot is not None:
        typer.echo(f"plot written to {plot}", err=format != "table" and output is None)


@app.command()
@one_line_errors
def show(
    store: StoreOpt,
    source_id: Annotated[int, typer.Option("--source-id", help="Gaia source_id of the star.")],
    release: Annotated[
        str | None, typer.Option(help="Release to look at (default: the star's latest).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw its spectra, predictions and components here (PNG).")
    ] = None,
) -> None:
    """One star: its score, explanation and components; with --plot, its spectra, the model's
    reconstructions and cross-predictions, residuals and component bars."""
    from specsearch.api import open_store

    star = open_store(store).show(source_id, release=release)
    score = star.view.score or {}
    typer.echo(
        f"source_id {source_id} ({star.view.release}): "
        + (
            f"score {score['score']:.2f}, rank {score['rank']}, {score['modality_tag']}; "
            f"{score['explanation']}"
            if score.get("score") is not None
            else "not scored"
        )
    )
    emit(
        star.table,
        "table",
        None,
        title="components (-log10 p against the reference)",
        summary=False,
    )
    if plot is not None:
        star.plot(plot)
        typer.echo(f"plot written to {plot}")


@app.command()
@one_line_errors
def mark(
    store: StoreOpt,
    source_ids: Annotated[
        list[int] | None, typer.Argument(help="The stars' Gaia source_ids.", show_default=False)
    ] = None,
    what: Annotated[
        str | None, typer.Option("--as", help="boring, artefact or interesting.")
    ] = None,
    note: Annotated[str, typer.Option(help="Why.")] = "",
    user: Annotated[str | None, typer.Option(help="Who (default: the login name).")] = None,
    release: Annotated[str | None, typer.Option(help="The release you looked at.")] = None,
    import_file: Annotated[
        Path | None,
        typer.Option("--import", help="CSV or Parquet of marks (source_id, mark[, note, user])."),
    ] = None,
) -> None:
    """Mark stars boring, artefact or interesting: the next reports rank stars like the boring
    ones lower (scores never change) and list the stars like the interesting ones."""
    from specsearch.query.triage import import_marks
    from specsearch.query.triage import mark as add_marks

    if import_file is not None:
        if source_ids or what:
            raise SpecsearchError("give --import alone, or source_ids with --as")
        typer.echo(f"imported {import_marks(store, import_file)} marks from {import_file}")
        return
    if not source_ids or what is None:
        raise SpecsearchError("give the stars' source_ids and --as boring|artefact|interesting")
    held = add_marks(store, source_ids, what, note=note, user=user, release=release)
    typer.echo(f"marked {len(source_ids)} star(s) {what}; the store holds {held} mark(s)")


@app.command()
@one_line_errors
def triage(
    store: StoreOpt,
    release: Annotated[
        str | None, typer.Option(help="Release (default: the latest scored).")
    ] = None,
    top: Annotated[int, typer.Option(help="Rows shown.")] = 20,
    format: FormatOpt = None,
    output: OutputOpt = None,
) -> None:
    """The anomalies of a release ranked after triage: stars marked boring or artefact, and
    the stars like them, pushed down with the reason; the stored scores are unchanged."""
    from specsearch.api import open_store

    result = open_store(store).scores(release, top=top)
    columns = ["adjusted_rank", "rank", "source_id", "score", "adjusted_score", "mark", "triage"]
    if format in (None, "table") and output is None:
        table = result.table.select(columns + ["driver", "modality_tag"])
    else:
        table = result.table.drop_columns(["signature"])
    emit(table, format, output, title=result.title + " after triage", summary=False, store=store)


@app.command()
@one_line_errors
def score(
    store: StoreOpt,
    release: Annotated[
        str | None, typer.Option(help="Release to score (default: every release not scored).")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Release to calibrate on, the first time (default: the first)."),
    ] = None,
) -> None:
    """Anomaly scores (components, combined score, explanation) and the kNN graph."""
    from specsearch.pipeline.score import score_store

    typer.echo(score_store(store, release=release, reference=reference))


@app.command()
@one_line_errors
def report(
    store: StoreOpt,
    release: Annotated[str, typer.Option(help="Release to report on.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    since: Annotated[
        str | None, typer.Option(help="Show the stars newly above threshold since this release.")
    ] = None,
    top: Annotated[int, typer.Option(help="Top anomalies shown in detail.")] = 50,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Score (-log10 p) from which a star counts as an anomaly (default: log10 of "
            "the release's size, where about one normal star passes by chance)."
        ),
    ] = None,
) -> None:
    """Self-contained HTML report with plots plus Parquet/CSV of the top anomalies."""
    from specsearch.pipeline.report import write_report

    typer.echo(
        write_report(
            store,
            release,
            out,
            since=since,
            top=top,
            threshold=threshold,
            command=" ".join(["specsearch", *sys.argv[1:]]),
        )
    )


@app.command()
def nightly(
    source: Annotated[Path, typer.Argument(help="File or folder of the new release's files.")],
    store: StoreOpt,
    release: Annotated[str, typer.Option(help="Release name.")],
    reference: Annotated[
        str | None, typer.Option(help="Release to calibrate on, the first time.")
    ] = None,
    model: ModelOpt = "default",
    top: Annotated[int, typer.Option(help="Top anomalies shown in the report.")] = 50,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a machine-readable summary (cron, monitoring).")
    ] = False,
) -> None:
    """Ingest + embed + index update + score + report, idempotent. Exit 0 ok, 2 bad input,
    1 otherwise."""

    from specsearch.pipeline.nightly import nightly as run_nightly

    try:
        result = run_nightly(
            source,
            store,
            release,
            reference=reference,
            model=model,
            top=top,
            show_progress=not json_output,
        )
    except (Exception, KeyboardInterrupt) as err:  # never a traceback
        _nightly_failure(err, json_output)
    typer.echo(result.to_json() if json_output else str(result))


def _nightly_failure(err: BaseException, json_output: bool) -> None:
    import json

    code, message = describe(err)
    if json_output:
        typer.echo(json.dumps({"status": "error", "exit": code, "message": message}))
    else:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
@one_line_errors
@without_pandas
def sql(
    store: StoreOpt,
    query: Annotated[str, typer.Argument(help="A DuckDB SQL query.")],
    format: FormatOpt = None,
    attach: Annotated[
        list[str] | None, typer.Option(help="NAME=PATH, a catalog as view NAME.")
    ] = None,
    output: OutputOpt = None,
    arrays: Annotated[
        bool, typer.Option("--arrays", help="Include the spectrum arrays in the shards view.")
    ] = False,
) -> None:
    """DuckDB over the store."""
    from specsearch.query.sql import connect, parse_attach
    from specsearch.query.sql import query as run_query

    con = connect(store, parse_attach(attach or []), with_arrays=arrays)
    relation = run_query(con, query)
    if relation is None:
        typer.echo("OK")
        return
    emit(relation, format, output, store=store)


@app.command()
@one_line_errors
def predict(
    file: Annotated[Path | None, typer.Argument(help="A spectrum file.")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Store directory.")] = None,
    release: ReleaseOpt = None,
    model: ModelOpt = "default",
    format: FormatOpt = None,
    output: OutputOpt = None,
) -> None:
    """Stellar labels (Teff, log g, \\[Fe/H], \\[alpha/M]) with uncertainties."""
    from specsearch.query.predict import predict_store, predict_table
    from specsearch.surveys.sources import read_source

    if (file is None) == (store is None):
        raise SpecsearchError("give a spectrum FILE or --store (not both)")
    if file is not None:
        table = predict_table(read_source(file)[0], model)
    else:
        table = predict_store(store, release, model)
    emit(table, format, output, title=f"stellar labels ({model})", summary=False, store=store)


@app.command()
@one_line_errors
def translate(
    to: Annotated[str, typer.Option("--to", help="Target modality: lrs or xp.")],
    source_id: Annotated[int | None, typer.Option("--source-id")] = None,
    spectrum: Annotated[Path | None, typer.Option(help="A spectrum file.")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Store for --source-id.")] = None,
    model: ModelOpt = "default",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the prediction here (.parquet/.csv)."),
    ] = None,
) -> None:
    """Cross-spectrum prediction: the XP spectrum of a star from its LRS, or the reverse."""
    import numpy as np
    import pyarrow as pa

    from specsearch.query.predict import rows_for, translate_rows
    from specsearch.surveys.sources import read_source

    if (source_id is None) == (spectrum is None):
        raise SpecsearchError("give exactly one of --source-id (with --store) or --spectrum")
    if source_id is not None:
        if store is None:
            raise SpecsearchError("--source-id needs --store")
        rows = rows_for(store, source_id)
    else:
        rows = read_source(spectrum)[0]
    table = translate_rows(rows, to, model)
    stars = np.unique(table.column("source_id").to_numpy())
    if output is None:
        title = (
            f"predicted {to.upper()} spectra for {len(stars)} star(s); "
            "use --output FILE.parquet|.csv for the pixels"
        )
        emit(pa.table({"source_id": stars}), "table", None, title=title, summary=False)
        return
    emit(table, None, output, summary=False, store=store)
    typer.echo(f"translate: {table.num_rows} pixels of predicted {to.upper()} written to {output}")


# --- training: the three stages share their loop options

DataOpt = Annotated[list[Path], typer.Option(help="Canonical shard folders or stores.")]
EpochsOpt = Annotated[int, typer.Option(help="Passes over the training data.")]
BatchOpt = Annotated[int, typer.Option(help="Examples per optimiser step.")]
LrOpt = Annotated[float, typer.Option(help="Peak learning rate.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue from the checkpoint in --out.")]


def _train_config(epochs: int, batch_size: int, lr: float, seed: int, weight_decay: float):
    from specsearch.train.loop import TrainConfig

    return TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, weight_decay=weight_decay
    )


@train_app.command("pretrain")
@one_line_errors
def train_pretrain(
    modality: Annotated[str, typer.Option(help="lrs, xp (OAE) or xp-transformer.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    config: Annotated[str, typer.Option(help="Model config: small or paper.")] = "small",
    epochs: EpochsOpt = 10,
    batch_size: BatchOpt = 256,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
) -> None:
    """Masked/auto-encoder pre-training of one modality's encoder."""
    from specsearch.train.pretrain import pretrain

    cfg = _train_config(epochs, batch_size, lr, seed, weight_decay=0.1)
    result = pretrain(modality, data, out, config, cfg, device, resume, log=typer.echo)
    typer.echo(
        f"pretrain {modality}: best loss {result['best']:.4g} after {result['epochs']} epochs -> {out}"
    )


@train_app.command("align")
@one_line_errors
def train_align(
    data: DataOpt,
    lrs_encoder: Annotated[Path, typer.Option(help="Pre-trained LRS encoder checkpoint.")],
    xp_encoder: Annotated[Path, typer.Option(help="Pre-trained XP encoder checkpoint.")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    variant: Annotated[str, typer.Option(help="base, pr or split.")] = "pr",
    config: Annotated[str, typer.Option(help="Model config: small or paper.")] = "small",
    epochs: EpochsOpt = 10,
    batch_size: BatchOpt = 512,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
) -> None:
    """CLIP alignment of the two encoders, with reconstruction and cross-prediction decoders."""
    from specsearch.train.align import align

    cfg = _train_config(epochs, batch_size, lr, seed, weight_decay=0.05)
    result = align(
        data, lrs_encoder, xp_encoder, out, variant, config, cfg, device, resume, log=typer.echo
    )
    typer.echo(f"align: best loss {result['best']:.4g} after {result['epochs']} epochs -> {out}")


@train_app.command("finetune")
@one_line_errors
def train_finetune(
    model: Annotated[Path, typer.Option(help="Aligned model checkpoint directory.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Output model directory.")],
    modality: Annotated[str, typer.Option(help="lrs, xp or both.")] = "both",
    epochs: EpochsOpt = 30,
    batch_size: BatchOpt = 256,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Label heads (teff, logg, fe_h, alpha_m with uncertainties) on the aligned embeddings."""
    from specsearch.train.finetune import finetune

    cfg = _train_config(epochs, batch_size, lr, seed, weight_decay=1e-4)
    results = finetune(model, data, out, modality, cfg, device, log=typer.echo)
    summary = ", ".join(f"{m}: best NLL {r['best']:.3f}" for m, r in results.items())
    typer.echo(f"finetune: {summary} -> {out}")


@models_app.command("list")
@one_line_errors
def models_list() -> None:
    """Models that are installed or shipped."""
    from rich.console import Console
    from rich.table import Table

    from specsearch.models.registry import (
        DEFAULT_MODEL_ID,
        SHIPPED_DIR,
        list_models,
        user_models_dir,
    )

    console = Console(width=None if sys.stdout.isatty() else 160)
    models = list_models()
    if not models:
        console.print(f"no models installed (shipped: {SHIPPED_DIR}, user: {user_models_dir()})")
        return
    table = Table()
    table.add_column("id", no_wrap=True)  # kept whole: it is what users type
    for name in ("source", "kind", "config", "variant", "dim", "description"):
        table.add_column(name)
    for m in models:
        default = " (default)" if m["id"] == DEFAULT_MODEL_ID else ""
        table.add_row(
            m["id"] + default,
            m["source"],
            m["kind"],
            str(m["config"]),
            str(m["variant"] or "-"),
            str(m["embed_dim"] or "-"),
            m["description"],
        )
    console.print(table)
    console.print(f"{len(models)} model(s)")


@models_app.command("info")
@one_line_errors
def models_info(model: Annotated[str, typer.Argument(help="Model id.")]) -> None:
    """Print a model's card: config, training data, the commands that made it, metrics."""
    import json

    from rich.console import Console

    from specsearch.models.registry import model_card

    Console().print_json(json.dumps(model_card(model), default=str))


@app.callback()
def options(
    no_wait: Annotated[
        bool,
        typer.Option("--no-wait", help="Fail at once when another process is writing the store."),
    ] = False,
) -> None:
    """Vector search and anomaly detection for stellar spectra (LAMOST LRS + Gaia XP)."""
    from specsearch.store import LockPolicy

    LockPolicy.wait = not no_wait
    LockPolicy.on_wait = lambda message: typer.echo(message + " ...", err=True)


def main() -> None:
    try:
        app()
    except SpecsearchError as err:  # errors raised while Typer parses
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
