"""The fault benchmark (long mode of tests/reliability): how often does specsearch lose data,
serve a silently wrong answer or print a traceback when things go wrong around it?

Trials, each on a fresh copy of a small store (300 + 200 stars of the bundled sample):

- kill -9 at a random moment of ingest, embed, index build, score and nightly, then the same
  command again (data must equal a run never killed, byte for byte);
- two writers at once (the second waits for the lock, or refuses with --no-wait);
- a full disk (a small tmpfs; root only) at every writing stage, at several free sizes;
- one damaged file of every kind (shard, rejects, embedding, calibration, score, index, index
  JSON, manifest) by random bytes, truncation, garbage or a swap with a valid file of its kind;
- damaged input files of every format read (hypothesis), through ingest and predict;
- search by id in fresh processes, repeated (a crash that shows once in many runs).

    python benchmarks/bench_faults.py [--work /tmp/bench-faults] [--kills 6] [--fuzz 100]

Prints the table of trials per kind with data lost, silent wrong answers, tracebacks and other
failures, and writes benchmarks/results/faults.json (every trial, with what it saw). The kinds
can run as separate processes side by side and be tabulated together:

    python benchmarks/bench_faults.py --only kill --work /tmp/f1 --out /tmp/f1.json &
    python benchmarks/bench_faults.py --only writers,disk,damage --work /tmp/f2 --out /tmp/f2.json &
    python benchmarks/bench_faults.py --only fuzz,crash --work /tmp/f3 --out /tmp/f3.json
    python benchmarks/bench_faults.py --merge /tmp/f1.json /tmp/f2.json /tmp/f3.json
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability.harness import (  # noqa: E402
    DAMAGE_TARGETS,
    KILL_STAGES,
    Trial,
    clean_chain,
    cli,
    damage_trial,
    disk_full_trial,
    is_traceback,
    kill_trial,
    source_release,
    tmpfs,
    two_writers_trial,
)

RESULTS = REPO / "benchmarks" / "results"


def fuzz_trials(work: Path, examples: int, rng: random.Random) -> list[Trial]:
    from typer.testing import CliRunner

    from specsearch.cli.app import app
    from tests.reliability.test_fuzz import KINDS, damaged, seeds

    runner = CliRunner()
    valid = seeds(work / "seeds")
    trials = []
    for kind in KINDS:
        data = valid[kind].read_bytes()
        for i in range(examples):
            edits = [
                (
                    rng.choice(["flip", "truncate", "insert", "delete", "zero"]),
                    rng.random(),
                    rng.randbytes(rng.randint(1, 64)),
                )
                for _ in range(rng.randint(1, 4))
            ]
            path = work / "in" / valid[kind].name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(damaged(data, edits))
            commands = [["ingest", str(path), "--store", str(work / "store"), "--release", "F",
                         "--replace"]]  # fmt: skip
            if kind != "shard parquet":
                commands.append(["predict", str(path)])
            for command in commands:
                trial = Trial("damaged input", f"{kind} #{i} {command[0]}")
                result = runner.invoke(app, command)
                if result.exception is not None and not isinstance(result.exception, SystemExit):
                    trial.tracebacks.append(repr(result.exception)[:300])
                elif is_traceback(result.output):
                    trial.tracebacks.append(result.output[-300:])
                elif result.exit_code != 0:
                    lines = result.stderr.strip().splitlines()
                    if result.exit_code not in (1, 2) or len(lines) != 1:
                        trial.tracebacks.append(f"exit {result.exit_code}: {result.stderr[-300:]}")
                    else:
                        trial.errors.append(lines[0])
                trials.append(trial)
    return trials


def crash_runs(work: Path, runs: int) -> list[Trial]:
    """``search --source-id`` in fresh processes, ``runs`` times each: a star with both spectra,
    and one with an LRS spectrum only, asked for its LRS and for its (missing) XP neighbours."""
    source = source_release(work / "src", 0, 300)
    table = pq.read_table(source / "part.parquet")
    lrs_only = table.column("source_id")[0].as_py()
    xp = table.column("xp_flux").to_pylist()
    xp[0] = None
    xp_type = table.schema.field("xp_flux").type
    import pyarrow as pa

    table = table.set_column(
        table.schema.get_field_index("xp_flux"), "xp_flux", pa.array(xp, type=xp_type)
    )
    pq.write_table(table, source / "part.parquet")
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    for args in (["ingest", str(source), "--release", "DR1"], ["embed"], ["index", "build"]):
        assert cli(*args, "--store", str(store)).returncode == 0
    both = table.column("source_id")[1].as_py()
    trials = []
    cases = (  # (star, modality, expected exit): an LRS-only star asked for its XP neighbours
        (lrs_only, "xp", 2, "LRS-only star, --modality xp (no XP embedding: one-line error)"),
        (lrs_only, "lrs", 0, "LRS-only star, --modality lrs"),
        (both, "xp", 0, "star with both, --modality xp"),
    )
    for i in range(runs):
        for star, modality, expected, what in cases:
            trial = Trial("search by id", f"{what}, run {i}")
            result = cli("search", "--store", str(store), "--source-id", str(star),
                         "--modality", modality, "-k", "5", "--format", "csv")  # fmt: skip
            text = result.stderr.strip()
            if is_traceback(text) or result.returncode not in (0, 1, 2):
                trial.tracebacks.append(f"exit {result.returncode}: {text[-300:]}")
            elif result.returncode != expected:
                trial.problems.append(f"exit {result.returncode}, {expected} expected: {text}")
            elif expected and len(text.splitlines()) != 1:
                trial.tracebacks.append(f"not one line: {text[-300:]}")
            trials.append(trial)
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-faults"))
    parser.add_argument("--kills", type=int, default=6, help="kill trials per stage")
    parser.add_argument("--fuzz", type=int, default=100, help="damaged files per input kind")
    parser.add_argument("--crash-runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", default=None, help="comma list: kill,writers,disk,damage,fuzz,crash"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    parser.add_argument("--merge", type=Path, nargs="+", help="tabulate these runs' JSON together")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    only = set(args.only.split(",")) if args.only else None
    trials: list[Trial] = []
    t0 = time.perf_counter()

    def wanted(name: str) -> bool:
        return only is None or name in only

    def report(trial: Trial) -> None:
        trials.append(trial)
        flag = "ok" if trial.passed else "FAIL"
        print(f"  {flag:4} {trial.kind}: {trial.detail} ({trial.seconds:.0f} s)", flush=True)
        if not trial.passed:
            for line in trial.wrong + trial.tracebacks + trial.problems:
                print(f"       {line[:200]}", flush=True)

    chain = None
    if wanted("kill") or wanted("writers") or wanted("disk") or wanted("damage"):
        print("building the clean chain ...", flush=True)
        chain = clean_chain(work / "chain")
        print("  stage seconds: " + ", ".join(
            f"{name} {s:.1f}" for (name, _), s in zip(chain.stages, chain.seconds, strict=True)
        ), flush=True)  # fmt: skip
    if wanted("kill"):
        for _ in range(args.kills):
            for stage in KILL_STAGES:
                report(kill_trial(chain, stage, work / "kill", rng))
    if wanted("writers"):
        for i in range(6):
            report(two_writers_trial(chain, work / "writers", no_wait=i % 2 == 1, rng=rng))
    if wanted("disk"):
        with tmpfs(work / "disk", 60) as disk:
            if disk is None:
                print("  (no tmpfs can be mounted here: disk-full trials skipped)")
            else:
                for stage in ("ingest", "embed", "index build", "score", "nightly"):
                    for leave in (16 << 10, 256 << 10, 2 << 20):
                        report(disk_full_trial(chain, stage, disk, leave))
    if wanted("damage"):
        for target in DAMAGE_TARGETS:
            for how in ("flip", "truncate", "garbage", "swap"):
                if target == "manifest" and how == "swap":
                    continue
                report(damage_trial(chain, target, how, work / "damage", rng))
    if wanted("fuzz"):
        fuzzed = fuzz_trials(work / "fuzz", args.fuzz, rng)
        trials += fuzzed
        bad = [t for t in fuzzed if not t.passed]
        print(f"  damaged input: {len(fuzzed)} runs, {len(bad)} failed", flush=True)
        for trial in bad[:20]:
            print(f"       {trial.detail}: {(trial.tracebacks + trial.problems)[0][:200]}")
    if wanted("crash"):
        runs = crash_runs(work / "crash", args.crash_runs)
        trials += runs
        bad = [t for t in runs if not t.passed]
        print(f"  search by id: {len(runs)} fresh processes, {len(bad)} failed", flush=True)
        for trial in bad[:20]:
            print(f"       {trial.detail}: {(trial.tracebacks + trial.problems)[0][:200]}")

    table = tabulate(
        [(t.kind, t.lost, len(t.wrong), len(t.tracebacks), bool(t.errors), len(t.problems))
         for t in trials]
    )  # fmt: skip
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{len(trials)} trials in {minutes:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": platform.platform(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "minutes": minutes,
        "table": {k: dict(v) for k, v in table.items()},
        "failed": [t.to_dict() for t in trials if not t.passed],
        "trials": [
            {"kind": t.kind, "detail": t.detail, "passed": t.passed, "seconds": t.seconds,
             "counts": [t.lost, len(t.wrong), len(t.tracebacks), bool(t.errors), len(t.problems)]}
            for t in trials
        ],
    }  # fmt: skip
    args.out.write_text(json.dumps(out, indent=1))


def tabulate(rows: list[tuple]) -> dict:
    """Print the table of (kind, lost, wrong, tracebacks, one-line error, other failures) rows."""
    table = collections.OrderedDict()
    for kind, lost, wrong, tracebacks, errors, problems in rows:
        row = table.setdefault(kind, collections.Counter())
        row["trials"] += 1
        row["lost"] += lost
        row["wrong"] += wrong
        row["tracebacks"] += tracebacks
        row["one-line errors"] += errors
        row["other failures"] += problems
    print()
    print("| fault | trials | data lost | silent wrong answers | tracebacks | "
          "one-line errors | other failures |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind, row in table.items():
        print(f"| {kind} | {row['trials']} | {row['lost']} | {row['wrong']} | "
              f"{row['tracebacks']} | {row['one-line errors']} | {row['other failures']} |")  # fmt: skip
    total = sum((row for row in table.values()), collections.Counter())
    print(f"| **all** | {total['trials']} | {total['lost']} | {total['wrong']} | "
          f"{total['tracebacks']} | {total['one-line errors']} | {total['other failures']} |")  # fmt: skip
    return table


def merge(paths: list[Path], out: Path) -> None:
    runs = [json.loads(p.read_text()) for p in paths]
    trials = [t for run in runs for t in run["trials"]]
    table = tabulate([(t["kind"], *t["counts"]) for t in trials])
    minutes = sum(run["minutes"] for run in runs)
    print(f"\n{len(trials)} trials in {minutes:.1f} min of runs ({len(runs)} side by side)")
    merged = {
        "machine": runs[0]["machine"],
        "runs": [run["args"] for run in runs],
        "minutes": minutes,
        "table": {k: dict(v) for k, v in table.items()},
        "failed": [f for run in runs for f in run["failed"]],
        "trials": trials,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
