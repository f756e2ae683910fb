"""The `specsearch` command line: thin Typer commands over the library.

Every command turns a SpecsearchError (bad input, missing store, unknown id) into one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from specsearch.errors import NotBuiltError, SpecsearchError

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
app.add_typer(models_app, name="models")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def one_line_errors(func):
    """Map library errors to a one-line message and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SpecsearchError as err:
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("specsearch"):
                raise
            fail(
                f"'specsearch {func.__name__.replace('_', ' ')}' is not built yet ({err.name} missing)"
            )
        except FileNotFoundError as err:
            fail(f"{err.filename}: no such file or directory")
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


@contextlib.contextmanager
def progress_bar(description: str, unit: str):
    """A progress bar (specsearch.progress); yields ``advance(done, total)`` for library callbacks."""
    from specsearch.progress import bar

    with bar(unit=unit) as display:
        task = display.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            display.update(task, completed=done, total=total)

        yield advance


def not_built(command: str, issue: str) -> None:
    raise NotBuiltError(f"'specsearch {command}' is not built yet ({issue})")


StoreOpt = Annotated[Path, typer.Option("--store", help="Store directory.")]
ReleaseOpt = Annotated[str | None, typer.Option("--release", help="Data-release name.")]


@app.command()
@one_line_errors
def demo(out: Annotated[Path, typer.Option(help="Output directory.")] = Path("demo-out")) -> None:
    """The main job on the bundled sample: ingest, embed, index, score, report, search, SQL."""
    from specsearch.demo import run_demo

    run_demo(out)


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
) -> None:
    """Write a synthetic paired LRS + XP release as canonical shards plus truth.parquet."""
    from specsearch.simulate import simulate_release

    with progress_bar("simulate", "stars") as advance:
        summary = simulate_release(
            out,
            n=n,
            seed=seed,
            release=release,
            anomaly_fraction=anomaly_fraction,
            real_xp_fraction=real_xp_fraction,
            real_xp_split=real_xp_split,
            progress=advance,
        )
    typer.echo(summary)


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
) -> None:
    """Raw survey files (LAMOST FITS, Gaia XP products) or shards into canonical shards."""
    from specsearch.ingest import ingest as ingest_files

    summary = ingest_files(source, store, release, workers=workers)
    typer.echo(summary)


@app.command()
@one_line_errors
def embed(
    store: StoreOpt,
    release: ReleaseOpt = None,
    model: Annotated[str, typer.Option(help="Model id.")] = "default",
    engine: Annotated[str, typer.Option(help="local or ray.")] = "local",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    ray_address: Annotated[
        str | None, typer.Option(help="Address of an existing Ray cluster.")
    ] = None,
) -> None:
    """Embeddings, reconstructions and cross-predictions into Parquet."""
    from specsearch.embed import embed_store

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
    target_recall: Annotated[float, typer.Option(help="Target recall@10 for auto tuning.")] = 0.95,
) -> None:
    """Build FAISS indexes over the store's embeddings."""
    from specsearch.indexes import build_store_indexes

    typer.echo(
        build_store_indexes(store, modality=modality, factory=factory, target_recall=target_recall)
    )


@app.command()
@one_line_errors
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
    format: Annotated[str, typer.Option(help="table, json, csv or parquet.")] = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write results here.")
    ] = None,
    model: Annotated[str, typer.Option(help="Model id, to encode a --spectrum query.")] = "default",
) -> None:
    """The k nearest neighbours of a star, in-modal or cross-modal."""
    from specsearch.search import search_cli

    search_cli(
        store,
        source_id=source_id,
        spectrum=spectrum,
        ids_file=ids_file,
        modality=modality,
        target=target,
        k=k,
        fmt=format,
        output=output,
        model=model,
    )


@app.command()
@one_line_errors
def score(store: StoreOpt, release: ReleaseOpt = None) -> None:
    """Anomaly scores and the kNN graph."""
    not_built("score", "anomaly scoring")


@app.command()
@one_line_errors
def report(
    store: StoreOpt,
    release: Annotated[str, typer.Option(help="Release to report on.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    since: Annotated[str | None, typer.Option(help="Only stars new since this release.")] = None,
) -> None:
    """HTML report with plots plus Parquet/CSV of the top anomalies."""
    not_built("report", "anomaly report")


@app.command()
@one_line_errors
def nightly(
    source: Annotated[Path, typer.Argument(help="Folder of the new release's files.")],
    store: StoreOpt,
    release: Annotated[str, typer.Option(help="Release name.")],
) -> None:
    """Ingest + embed + index update + score + report; idempotent."""
    not_built("nightly", "nightly anomaly reports")


@app.command()
@one_line_errors
def sql(
    store: StoreOpt,
    query: Annotated[str, typer.Argument(help="A DuckDB SQL query.")],
    format: Annotated[str, typer.Option(help="table, csv, json or parquet.")] = "table",
    attach: Annotated[
        list[str] | None, typer.Option(help="NAME=PATH, a catalog as view NAME.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write results here.")
    ] = None,
    arrays: Annotated[
        bool, typer.Option("--arrays", help="Include the spectrum arrays in the shards view.")
    ] = False,
) -> None:
    """DuckDB over the store."""
    from specsearch.sql import sql_cli

    sql_cli(store, query, fmt=format, attach=attach or [], output=output, with_arrays=arrays)


@app.command()
@one_line_errors
def predict(
    file: Annotated[Path | None, typer.Argument(help="A spectrum file.")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Store directory.")] = None,
    release: ReleaseOpt = None,
    model: Annotated[str, typer.Option(help="Model id.")] = "default",
    format: Annotated[str, typer.Option(help="table, csv, json or parquet.")] = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write results here.")
    ] = None,
) -> None:
    """Stellar labels (Teff, log g, \\[Fe/H], \\[alpha/M]) with uncertainties."""
    from specsearch.predict import predict_cli

    predict_cli(file=file, store=store, release=release, model=model, fmt=format, output=output)


@app.command()
@one_line_errors
def translate(
    to: Annotated[str, typer.Option("--to", help="Target modality: lrs or xp.")],
    source_id: Annotated[int | None, typer.Option("--source-id")] = None,
    spectrum: Annotated[Path | None, typer.Option(help="A spectrum file.")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Store for --source-id.")] = None,
    model: Annotated[str, typer.Option(help="Model id.")] = "default",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the prediction here (.parquet/.csv)."),
    ] = None,
) -> None:
    """Cross-spectrum prediction: the XP spectrum of a star from its LRS, or the reverse."""
    from specsearch.predict import translate_cli

    translate_cli(
        to=to, source_id=source_id, spectrum=spectrum, store=store, model=model, output=output
    )


@train_app.command("pretrain")
@one_line_errors
def train_pretrain(
    modality: Annotated[str, typer.Option(help="lrs, xp (OAE) or xp-transformer.")],
    data: Annotated[list[Path], typer.Option(help="Canonical shard folders or stores.")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    config: Annotated[str, typer.Option(help="Model config: small or paper.")] = "small",
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option()] = 256,
    lr: Annotated[float, typer.Option()] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option()] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out.")] = False,
) -> None:
    """Masked/auto-encoder pre-training of one modality's encoder."""
    from specsearch.train.pretrain import pretrain_cli

    pretrain_cli(
        modality=modality,
        data=data,
        out=out,
        config=config,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        resume=resume,
    )


@train_app.command("align")
@one_line_errors
def train_align(
    data: Annotated[list[Path], typer.Option(help="Paired canonical shard folders or stores.")],
    lrs_encoder: Annotated[Path, typer.Option(help="Pre-trained LRS encoder checkpoint.")],
    xp_encoder: Annotated[Path, typer.Option(help="Pre-trained XP encoder checkpoint.")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    variant: Annotated[str, typer.Option(help="base, pr or split.")] = "pr",
    config: Annotated[str, typer.Option()] = "small",
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option()] = 512,
    lr: Annotated[float, typer.Option()] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option()] = "auto",
    resume: Annotated[bool, typer.Option()] = False,
) -> None:
    """CLIP alignment of the two encoders, with reconstruction and cross-prediction decoders."""
    from specsearch.train.align import align_cli

    align_cli(
        data=data,
        lrs_encoder=lrs_encoder,
        xp_encoder=xp_encoder,
        out=out,
        variant=variant,
        config=config,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        resume=resume,
    )


@train_app.command("finetune")
@one_line_errors
def train_finetune(
    model: Annotated[Path, typer.Option(help="Aligned model checkpoint directory.")],
    data: Annotated[list[Path], typer.Option(help="Labelled canonical shard folders or stores.")],
    out: Annotated[Path, typer.Option(help="Output model directory.")],
    modality: Annotated[str, typer.Option(help="lrs, xp or both.")] = "both",
    epochs: Annotated[int, typer.Option()] = 30,
    batch_size: Annotated[int, typer.Option()] = 256,
    lr: Annotated[float, typer.Option()] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Label heads (teff, logg, fe_h, alpha_m with uncertainties) on the aligned embeddings."""
    from specsearch.train.finetune import finetune_cli

    finetune_cli(
        model=model,
        data=data,
        out=out,
        modality=modality,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
    )


@models_app.command("list")
@one_line_errors
def models_list() -> None:
    """Models that are installed or shipped."""
    from specsearch.models.registry import list_models_cli

    list_models_cli()


@models_app.command("info")
@one_line_errors
def models_info(model: Annotated[str, typer.Argument(help="Model id.")]) -> None:
    """Print a model's card: config, training data, the commands that made it, metrics."""
    from specsearch.models.registry import model_info_cli

    model_info_cli(model)


def main() -> None:
    try:
        app()
    except SpecsearchError as err:  # errors raised while Typer parses
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
