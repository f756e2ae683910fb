"""The fault-injection harness shared by tests/reliability (fast mode) and
benchmarks/bench_faults.py (long mode).

A *trial* does one harmful thing to a store (kills a stage with SIGKILL at a random moment, fills
the disk, runs two writers at once, damages a file) and then asks the questions a user would:
is every star still there exactly once, does every answer the store gives equal the answer of a
store that never saw the fault (or is it a one-line error), and does the index hold exactly the
embedded stars. ``Trial`` records the answers; the long mode tabulates them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "specsearch" / "data" / "sample"
CLI = [sys.executable, "-m", "specsearch.cli.app"]


# ------------------------------------------------------------------ sources and stores


def source_release(folder: Path, first: int, n: int, name: str = "part.parquet") -> Path:
    """``n`` stars of the bundled sample (from row ``first`` of its DR1) as a shard file."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(SAMPLE / "release=DR1" / "part-00000.parquet").slice(first, n)
    pq.write_table(table, folder / name)
    return folder


def cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``specsearch ARGS`` in a fresh process; never raises for a non-zero exit."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def build_store(work: Path, releases: dict[str, Path], score: bool = True) -> Path:
    """A store with ``releases`` ingested (in order), embedded, indexed and (with ``score``)
    scored against the first."""
    store = work / "store"
    for release, source in releases.items():
        ok(cli("ingest", str(source), "--store", str(store), "--release", release))
    ok(cli("embed", "--store", str(store)))
    ok(cli("index", "build", "--store", str(store)))
    if score:
        ok(cli("score", "--store", str(store)))
    return store


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise AssertionError(f"{result.args}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def copy_store(store: Path, to: Path) -> Path:
    """A copy keeping files' times (the manifest's records hold)."""
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(store, to, symlinks=True)
    (to / ".lock").unlink(missing_ok=True)
    return to


# ------------------------------------------------------------------ what a user sees


QUERIES = {
    "stars": "SELECT count(*) AS n, count(DISTINCT source_id) AS ids, "
    "round(sum(teff), 1) AS teff FROM shards",
    "embedded": "SELECT modality, count(*) AS n, count(DISTINCT source_id) AS ids, "
    "round(sum(pred_teff), 1) AS teff FROM embeddings GROUP BY modality ORDER BY modality",
    "scores": "SELECT count(*) AS n, round(sum(score), 3) AS score FROM scores",
}


def answers(store: Path, probe_id: int | None = None) -> dict[str, tuple[int, str]]:
    """What a user reads from the store: {question: (exit status, stdout or stderr)}."""
    out = {}
    for name, query in QUERIES.items():
        result = cli("sql", "--store", str(store), query, "--format", "csv")
        out[name] = _answer(result, store)
    if probe_id is not None:
        for modality in ("lrs", "xp"):
            result = cli(
                "search", "--store", str(store), "--source-id", str(probe_id),
                "--modality", modality, "-k", "5", "--format", "csv",
            )  # fmt: skip
            out[f"search {modality}"] = _answer(result, store)
    return out


def _answer(result: subprocess.CompletedProcess, store: Path) -> tuple[int, str]:
    """(exit status, what was printed), the store's path written STORE (stores compared
    live in different folders)."""
    if result.returncode == 0:
        return 0, result.stdout.strip().replace(str(store), "STORE")
    return result.returncode, result.stderr.strip().replace(str(store), "STORE")


def is_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text or "terminate called" in text


def judge(seen: dict[str, tuple[int, str]], allowed: list[dict[str, tuple[int, str]]]) -> dict:
    """Compare a store's answers with those of stores that never saw the fault (any of
    ``allowed``: e.g. before and after the interrupted stage). An answer is fine when it
    equals an allowed one or is a one-line error; a different answer is a silent wrong answer."""
    wrong, tracebacks, errors = [], [], []
    for question, (code, text) in seen.items():
        if any(a.get(question) == (code, text) for a in allowed):
            continue  # what a store that never saw the fault answers (an error included)
        if is_traceback(text):
            tracebacks.append(f"{question}: {text[-300:]}")
        elif code != 0:
            if len(text.splitlines()) != 1 or not text.startswith("error: "):
                tracebacks.append(f"{question}: not one line: {text[-300:]}")
            else:
                errors.append(f"{question}: {text}")
        else:
            wrong.append(f"{question}: {text[:300]}")
    return {"wrong": wrong, "tracebacks": tracebacks, "errors": errors}


# ------------------------------------------------------------------ invariants


def invariants(store: Path) -> list[str]:
    """What must hold of a committed store: every shard star once per release, the current
    embedding ids those of the current shard rows that have each modality, the index ids the
    current embedding ids (no duplicate, none missing), and ``check`` passing."""
    from specsearch.indexes.io import index_ids, load_index
    from specsearch.store import Store

    problems = []
    st = Store.open(store)
    for release in st.releases():
        ids = st.read_shards(columns=["source_id"], release=release).column("source_id")
        ids = ids.to_numpy()
        if len(np.unique(ids)) != len(ids):
            problems.append(f"release {release}: duplicated source_id")
    rows = st.read_shards(columns=["source_id", "lrs_flux", "xp_flux"])
    manifest = st.read_manifest()
    for modality in st.embedding_modalities():
        has = rows.column(f"{modality}_flux").is_valid().to_numpy(zero_copy_only=False)
        want = np.sort(rows.column("source_id").to_numpy()[has])
        got = np.sort(st.embeddings(modality, columns=["source_id"]).column("source_id").to_numpy())
        if not st.missing_embeddings() and not np.array_equal(want, got):
            problems.append(
                f"{modality} embeddings: {len(got)} ids, the shards have {len(want)} "
                f"({len(np.setdiff1d(want, got))} missing, {len(np.setdiff1d(got, want))} extra)"
            )
        entry = manifest.get("indexes", {}).get(modality)
        if entry and entry.get("covers") in (None, st._embedding_digest(modality)):
            # an index built before the last embed is stale (searches refuse it) until rebuilt
            index, _ = load_index(st.index_dir(), modality)
            held = np.sort(index_ids(index))
            if not np.array_equal(held, got):
                problems.append(
                    f"{modality} index: {len(held)} ids ({len(held) - len(np.unique(held))} "
                    f"duplicated), the embeddings {len(got)}"
                )
    check = cli("check", "--store", str(store))
    if check.returncode != 0:
        problems.append(f"check: exit {check.returncode}: {check.stdout[-500:]}{check.stderr}")
    return problems


def content(store: Path, parts: tuple[str, ...] = ("shards", "embeddings", "scores")) -> dict:
    """{relative path: SHA-256} of a store's data files: two stores with equal content hold
    the same data, whatever their history."""
    out = {}
    for part in parts:
        for path in sorted((store / part).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(store))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------ faults


@dataclass
class Trial:
    """One fault and what followed it."""

    kind: str
    detail: str
    lost: int = 0  # stars or files gone for good (data lost)
    wrong: list[str] = field(default_factory=list)  # answers that differ, served as fine
    tracebacks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one-line errors (fine)
    problems: list[str] = field(default_factory=list)  # broken invariants after recovery
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not (self.lost or self.wrong or self.tracebacks or self.problems)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def kill_at(args: list[str], delay: float, timeout: float = 600) -> tuple[int, list[int]]:
    """Start ``specsearch ARGS``, SIGKILL it after ``delay`` seconds (if still running).
    Returns (exit status, pids of its children still alive 2 s later)."""
    process = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    code = process.wait(timeout=timeout)
    time.sleep(2.0)
    survivors = _group_members(process.pid)
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return code, survivors


def _group_members(pgid: int) -> list[int]:
    """Live processes of a process group (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def damage(path: Path, how: str, rng: random.Random, other: Path | None = None) -> str:
    """Damage one file: ``flip`` random bytes in place, ``truncate`` it, ``swap`` it with
    ``other`` (a valid file of the same kind), or ``garbage`` (random bytes of the same size)."""
    size = path.stat().st_size
    if how == "flip":
        with open(path, "r+b") as f:
            at = rng.randrange(max(1, size))
            f.seek(at)
            span = min(size - at, rng.choice([1, 16, 4096, 65536]))
            f.write(bytes(rng.randrange(256) for _ in range(max(1, span))))
        return f"{span} random bytes at {at} of {size}"
    if how == "truncate":
        keep = rng.randrange(size) if size else 0
        os.truncate(path, keep)
        return f"truncated to {keep} of {size} bytes"
    if how == "swap":
        assert other is not None
        tmp = path.with_name(path.name + ".swap")
        os.replace(path, tmp)
        os.replace(other, path)
        os.replace(tmp, other)
        return f"swapped with {other.name}"
    if how == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(size)))
        return f"{size} random bytes"
    raise ValueError(how)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))


# ------------------------------------------------------------------ kill -9 at a random moment


@dataclass
class Chain:
    """Clean stores, each one stage further than the one before: ``states[k]`` is the store
    after ``stages[k - 1]`` ran to its end on ``states[k - 1]`` (``states[0]`` is the start),
    with each state's answers and data content, and how long each stage took."""

    stages: list[tuple[str, list[str]]]
    states: list[Path]
    answers: list[dict]
    contents: list[dict]
    seconds: list[float]
    probe_id: int

    def span(self, stage: str) -> tuple[int, int, int]:
        """(the stage's number, the state it starts from, the state it ends in): nightly runs
        every stage, from the first state to the last."""
        k = [name for name, _ in self.stages].index(stage)
        if stage == "nightly":
            return k, 0, len(self.states) - 1
        return k, k, k + 1


KILL_STAGES = ("ingest", "embed", "index build", "score", "nightly")


def clean_chain(work: Path, n_old: int = 300, n_new: int = 200, start: Path | None = None) -> Chain:
    """DR1 (``n_old`` stars) ingested, embedded, indexed and scored (or a copy of ``start``);
    then DR2 (``n_new`` stars, half of them re-observed) taken through ingest, embed, index
    build and score, one clean store per step."""
    old = source_release(work / "src" / "DR1", 0, n_old)
    new = source_release(work / "src" / "DR2", n_old - n_new // 2, n_new)
    if start is None:
        start = build_store(work / "c0", {"DR1": old})
    else:
        start = copy_store(start, work / "c0" / "store")
    stages = [
        ("ingest", ["ingest", str(new), "--release", "DR2"]),
        ("embed", ["embed"]),
        ("index build", ["index", "build"]),
        ("score", ["score"]),
    ]
    states, seconds = [start], []
    for k, (_, args) in enumerate(stages, start=1):
        store = copy_store(states[-1], work / f"c{k}" / "store")
        t0 = time.perf_counter()
        ok(cli(*args, "--store", str(store)))
        seconds.append(time.perf_counter() - t0)
        states.append(store)
    stages.append(("nightly", ["nightly", str(new), "--release", "DR2"]))
    probe = int(pq.read_table(old / "part.parquet", columns=["source_id"])[0][n_old - 1].as_py())
    return Chain(
        stages=stages,
        states=states,
        answers=[answers(s, probe) for s in states],
        contents=[content(s) for s in states],
        seconds=seconds + [sum(seconds)],
        probe_id=probe,
    )


def rerun_ok(stage: str, result: subprocess.CompletedProcess) -> bool:
    """The same command again succeeded, or (an ingest that had committed before it was
    stopped) says the release is there already: both leave the clean run's store."""
    if result.returncode == 0:
        return True
    return stage == "ingest" and result.returncode == 2 and "already in the store" in result.stderr


def kill_trial(chain: Chain, stage: str, work: Path, rng: random.Random) -> Trial:
    """Kill ``stage`` with SIGKILL at a random moment of its clean run time, read the store as a
    user would, run the stage again, and compare with the clean store: the same data (byte for
    byte), the same answers, every invariant."""
    k, before, after = chain.span(stage)
    args = chain.stages[k][1]
    delay = rng.uniform(0.1, 0.9) * chain.seconds[k]
    trial = Trial("kill -9", "")
    t0 = time.perf_counter()
    for _ in range(4):  # a run faster than the clean one may end before the kill: kill sooner
        store = copy_store(chain.states[before], work / "store")
        code, survivors = kill_at([*args, "--store", str(store)], delay)
        if code != 0:
            break
        delay /= 2
    trial.detail = f"{stage} at {delay:.1f} s of {chain.seconds[k]:.1f} s"
    if survivors:
        trial.problems.append(f"{len(survivors)} worker processes outlived the killed run")
    if code == 0:
        trial.detail += " (finished before the kill)"
    seen = answers(store, chain.probe_id)
    # nightly commits stage by stage: broken off, the store is as after one of its stages
    allowed = chain.answers if stage == "nightly" else [chain.answers[before], chain.answers[after]]
    verdict = judge(seen, allowed)
    trial.wrong += verdict["wrong"]
    trial.tracebacks += verdict["tracebacks"]
    trial.errors += verdict["errors"]
    again = cli(*args, "--store", str(store))
    if not rerun_ok(stage, again):
        trial.problems.append(f"rerun of {stage}: exit {again.returncode}: {again.stderr[-300:]}")
        if is_traceback(again.stderr):
            trial.tracebacks.append(f"rerun of {stage}: {again.stderr[-300:]}")
    mine, clean = content(store), chain.contents[after]
    trial.lost = len(set(clean) - set(mine))
    changed = sorted(p for p in clean if p in mine and mine[p] != clean[p])
    extra = sorted(set(mine) - set(clean))
    if changed or extra:
        trial.problems.append(f"data differs from the clean run: {changed[:3]} {extra[:3]}")
    seen = answers(store, chain.probe_id)
    verdict = judge(seen, [chain.answers[after]])
    trial.wrong += verdict["wrong"]
    trial.tracebacks += verdict["tracebacks"]
    trial.problems += [f"after the rerun: {e}" for e in verdict["errors"]]
    trial.problems += invariants(store)
    trial.seconds = time.perf_counter() - t0
    return trial


# ------------------------------------------------------------------ a full disk


@contextlib.contextmanager
def tmpfs(path: Path, megabytes: int):
    """A tmpfs of ``megabytes`` mounted at ``path`` (root only); yields None where it cannot be
    mounted."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
        capture_output=True,
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the disk's free space (file ``disk/filler``)."""
    stat = os.statvfs(disk)
    with open(disk / "filler", "ab") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def disk_full_trial(chain: Chain, stage: str, disk: Path, leave: int) -> Trial:
    """Run ``stage`` with only ``leave`` bytes free: it succeeds as the clean run did, or fails
    in one line (exit 1) with the store as it was; with the space back, the same command gives
    the clean run's data."""
    k, before, after = chain.span(stage)
    args = chain.stages[k][1]
    trial = Trial("disk full", f"{stage} with {leave // 1024} KB free")
    t0 = time.perf_counter()
    (disk / "filler").unlink(missing_ok=True)
    store = copy_store(chain.states[before], disk / "store")
    fill(disk, leave)
    snapshot = content(store, ("shards", "embeddings", "scores", "indexes", "reports"))
    manifest = (store / "manifest.json").read_bytes()
    result = cli(*args, "--store", str(store))
    text = result.stderr.strip()
    if is_traceback(text):
        trial.tracebacks.append(text[-300:])
    elif result.returncode != 0:
        if result.returncode != 1 or len(text.splitlines()) != 1:
            trial.tracebacks.append(f"not one line, exit {result.returncode}: {text[-300:]}")
        else:
            trial.errors.append(text)
        now = content(store, ("shards", "embeddings", "scores", "indexes", "reports"))
        if now != snapshot or (store / "manifest.json").read_bytes() != manifest:
            trial.problems.append("the failed run changed the store")
    (disk / "filler").unlink(missing_ok=True)
    again = cli(*args, "--store", str(store))
    if not rerun_ok(stage, again):
        trial.problems.append(f"rerun: exit {again.returncode}: {again.stderr[-300:]}")
    mine, clean = content(store), chain.contents[after]
    trial.lost = len(set(clean) - set(mine))
    if mine != clean:
        trial.problems.append("data differs from the clean run")
    verdict = judge(answers(store, chain.probe_id), [chain.answers[after]])
    trial.wrong += verdict["wrong"]
    trial.tracebacks += verdict["tracebacks"]
    trial.problems += verdict["errors"]
    trial.seconds = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    return trial


# ------------------------------------------------------------------ two writers


def two_writers_trial(chain: Chain, work: Path, no_wait: bool, rng: random.Random) -> Trial:
    """Two ingests of different releases into one store at once: both land (the second waits
    for the first), or with ``--no-wait`` the second refuses in one line and nothing is lost."""
    store = copy_store(chain.states[0], work / "store")
    sources = [
        source_release(work / "w" / name, first, 50) for name, first in (("A", 400), ("B", 450))
    ]
    trial = Trial("two writers", "second with --no-wait" if no_wait else "second waits")
    t0 = time.perf_counter()
    stagger = rng.uniform(0, 1.5)
    procs = []
    for i, (name, source) in enumerate(zip(("WA", "WB"), sources, strict=True)):
        extra = ["--no-wait"] if (no_wait and i == 1) else []
        procs.append(
            subprocess.Popen(
                [*CLI, *extra, "ingest", str(source), "--store", str(store), "--release", name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        )
        time.sleep(stagger)
    landed = []
    for name, proc in zip(("WA", "WB"), procs, strict=True):
        out, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            landed.append(name)
        elif is_traceback(err):
            trial.tracebacks.append(err[-300:])
        elif proc.returncode == 1 and len(err.strip().splitlines()) == 1 and no_wait:
            trial.errors.append(err.strip())
        else:
            trial.problems.append(f"{name}: exit {proc.returncode}: {err[-300:]}")
    from specsearch.store import Store

    held = Store.open(store).releases()
    trial.lost = sum(1 for name in landed if name not in held)
    rows = cli("sql", "--store", str(store), "SELECT count(*) FROM shards", "--format", "csv")
    expected = 300 + 50 * len(landed)
    if rows.returncode != 0 or rows.stdout.strip().splitlines()[-1] != str(expected):
        trial.wrong.append(f"{rows.stdout.strip()} rows, {expected} expected")
    trial.problems += invariants(store)
    trial.seconds = time.perf_counter() - t0
    return trial


# ------------------------------------------------------------------ damaged files


DAMAGE_TARGETS = {
    "shard": "shards/release=DR1/part-*.parquet",
    "rejects": "shards/release=DR1/rejects.parquet",
    "embedding": "embeddings/release=DR1/modality=xp/*.parquet",
    "calibration": "scores/reference/*",
    "score": "scores/release=DR2/*.parquet",
    "index": "indexes/xp.faiss",
    "index json": "indexes/xp.json",
    "manifest": "manifest.json",
}


def damage_trial(chain: Chain, target: str, how: str, work: Path, rng: random.Random) -> Trial:
    """Damage one file of a finished store: every answer is the clean one or a one-line error,
    ``check`` finds it, ``check --repair`` makes derived files again (answers equal the clean
    store's again); a damaged shard stays reported (only its source can restore it)."""
    clean = chain.states[-1]
    store = copy_store(clean, work / "store")
    files = sorted(store.glob(DAMAGE_TARGETS[target]))
    trial = Trial("damaged file", f"{target}: {how}")
    if not files:
        trial.problems.append(f"no {target} file in the store")
        return trial
    t0 = time.perf_counter()
    path = rng.choice(files)
    if how == "swap":  # with a valid file of the same kind (another release's, modality's)
        pattern = DAMAGE_TARGETS[target].replace("DR1", "*").replace("DR2", "*")
        data = path.read_bytes()
        others = [
            p for p in store.glob(pattern.replace("xp", "*")) if p != path and p.read_bytes() != data
        ]  # fmt: skip
        if not others:  # (two releases without rejects hold the same bytes: no damage)
            trial.kind = "damaged file (none to swap)"
            trial.detail += ": no other file of its kind with other bytes"
            return trial
        trial.detail += ": " + damage(path, how, rng, rng.choice(others))
    else:
        trial.detail += ": " + damage(path, how, rng)
    verdict = judge(answers(store, chain.probe_id), [chain.answers[-1]])
    trial.wrong += verdict["wrong"]
    trial.tracebacks += verdict["tracebacks"]
    trial.errors += verdict["errors"]
    found = cli("check", "--store", str(store))
    if is_traceback(found.stderr):
        trial.tracebacks.append(found.stderr[-300:])
    elif found.returncode == 0:
        trial.wrong.append("check passed a damaged store")
    repair = cli("check", "--store", str(store), "--repair")
    if is_traceback(repair.stderr):
        trial.tracebacks.append(repair.stderr[-300:])
    if target in ("shard", "rejects"):
        if repair.returncode == 0:
            trial.wrong.append("repair called a store with a damaged shard whole")
    else:
        if repair.returncode != 0:
            trial.problems.append(f"repair: exit {repair.returncode}: {repair.stdout[-300:]}")
        verdict = judge(answers(store, chain.probe_id), [chain.answers[-1]])
        trial.wrong += verdict["wrong"]
        trial.tracebacks += verdict["tracebacks"]
        trial.problems += [f"after repair: {e}" for e in verdict["errors"]]
        mine = content(store, ("shards",))
        trial.lost = sum(1 for p, h in content(clean, ("shards",)).items() if mine.get(p) != h)
    trial.seconds = time.perf_counter() - t0
    return trial
