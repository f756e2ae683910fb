"""The pictures in docs/, made from the store `specsearch demo` writes, as a user sees them.

    python scripts/doc_images.py [--demo-out demo-out]

Runs the demo first if its store is not there. Headless Chromium (Debian's `chromium` package)
renders the DR2 report: its first screen goes to docs/report.png. The strangest DR2 star:
`specsearch show --plot` goes to docs/plots/show.png and `specsearch search --plot` (its XP
neighbours) to docs/plots/search.png.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    report = args.demo_out / "store" / "reports" / "release=DR2" / "report.html"
    if not report.exists():
        from specsearch.pipeline.demo import run_demo

        run_demo(args.demo_out, show=print)
    from specsearch.pipeline.report import HEADLESS_CHROMIUM

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *HEADLESS_CHROMIUM,
                f"--user-data-dir={profile}",
                "--window-size=1280,960",
                f"--screenshot={DOCS / 'report.png'}",
                report.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
        )
    from typer.testing import CliRunner

    from specsearch.cli.app import app

    store = args.demo_out / "store"
    first = re.search(r'<section class="star" id="star-(\d+)"', report.read_text()).group(1)
    for command in (
        [
            "show",
            "--store",
            str(store),
            "--source-id",
            first,
            "--plot",
            str(DOCS / "plots" / "show.png"),
        ],
        [
            "search",
            "--store",
            str(store),
            "--source-id",
            first,
            "-k",
            "5",
            "--plot",
            str(DOCS / "plots" / "search.png"),
        ],
    ):
        result = CliRunner().invoke(app, command)
        if result.exit_code != 0:
            raise SystemExit(result.output)
    print(
        f"wrote {DOCS / 'report.png'}, {DOCS / 'plots' / 'show.png'}, {DOCS / 'plots' / 'search.png'}"
    )


if __name__ == "__main__":
    main()
