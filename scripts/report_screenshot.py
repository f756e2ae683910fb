"""Screenshots of the anomaly report as a user sees it, for docs/.

    python scripts/report_screenshot.py [--demo-out demo-out]

Uses the store that `specsearch demo` wrote (running the demo first if it is not there), and
headless Chromium (Debian's `chromium` package) to render the DR2 report: its first screen goes to
docs/report.png and the figure of its strangest star to docs/plots/report_star.png.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    report = args.demo_out / "store" / "reports" / "release=DR2" / "report.html"
    if not report.exists():
        from specsearch.pipeline.demo import run_demo

        run_demo(args.demo_out, show=print)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *FLAGS,
                f"--user-data-dir={profile}",
                "--window-size=1280,960",
                f"--screenshot={DOCS / 'report.png'}",
                report.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
        )
    # the first star's figure, as the page embeds it
    first = re.search(
        r'<section class="star".*?src="data:image/png;base64,([^"]+)"', report.read_text(), re.S
    )
    (DOCS / "plots" / "report_star.png").write_bytes(base64.b64decode(first.group(1)))
    print(f"wrote {DOCS / 'report.png'} and {DOCS / 'plots' / 'report_star.png'}")


if __name__ == "__main__":
    main()
