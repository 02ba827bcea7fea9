"""Render a comparison's report.html in headless Chromium and check that the table and the plots show.

    python benchmarks/report_screenshot.py runs/compare_sentiment/report.html --out runs/compare_sentiment/shot.png

Checks: the plots drew (coloured pixels: the table and text are black and grey, a broken or blocked image
shows none; a page with images that failed to load has ~0.003% of them, a good one ~0.25%), and the table
drew (a second screenshot of the page without its tables differs from the first). Prints one JSON line and
exits 1 if a check fails. Needs Debian's `chromium` (or `--chromium PATH`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from matplotlib.image import imread

# Flags that keep Chromium from reaching the network at start (the machines here have none) and run it as root.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MIN_COLOURED = 0.0005  # share of saturated pixels the plots must bring
MIN_CHANGED = 0.02  # share of pixels that removing the tables must change


def screenshot(chromium: str, html: Path, png: Path, width: int, height: int) -> np.ndarray:
    """RGB pixels [height, width, 3] in 0..1 of `html` rendered by Chromium."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png}", html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    return imread(png)[..., :3]


def changed_share(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b).max(-1) > 0.05).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="screenshot PNG (default: next to the HTML)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    out = args.out or args.html.with_name("report_screenshot.png")
    page = args.html.read_text()
    start = time.perf_counter()
    full = screenshot(args.chromium, args.html, out, args.width, args.height)
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "without_tables.html"
        html.write_text(re.sub(r"<table>.*?</table>", "", page, flags=re.DOTALL))
        no_tables = screenshot(args.chromium, html, Path(tmp) / "without_tables.png", args.width, args.height)
    coloured = float((full.max(-1) - full.min(-1) > 0.3).mean())
    result = {"html": str(args.html), "screenshot": str(out), "seconds": round(time.perf_counter() - start, 2),
              "size": [int(full.shape[1]), int(full.shape[0])],
              "non_white_share": round(float((full.min(-1) < 0.95).mean()), 4),
              "images_in_page": page.count("<img "), "coloured_share": round(coloured, 5),
              "changed_without_tables": round(changed_share(full, no_tables), 4)}
    result["ok"] = bool(result["images_in_page"] >= 3 and coloured >= MIN_COLOURED
                        and result["changed_without_tables"] >= MIN_CHANGED)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
