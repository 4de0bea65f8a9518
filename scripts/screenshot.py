"""Screenshot TensorBoard's Custom Scalars tab (the dynlens panels) into ``docs/``.

Starts the venv's ``tensorboard`` on ``LOGDIR`` (default ``runs/demo``, from ``make demo``) on
127.0.0.1 and a free port, waits until it serves the runs' custom-scalars layout and scalars,
then loads the Custom Scalars tab in headless Chromium and saves a PNG. The server is always
stopped, and Chromium runs with a fresh profile, no network services and no sandbox (it runs as
root in the project's machines). Needs Debian's ``chromium`` package
(``apt-get install -y chromium``) or ``--chromium PATH``.

    python scripts/screenshot.py [LOGDIR] [--out docs/tensorboard_panels.png] [--wait 20000]

``--category`` keeps only panels whose title matches a regex (TensorBoard's own filter box),
e.g. ``--category grokking``; ``--run`` only runs matching a regex. ``--scale 2`` renders at
twice the pixel density (a PNG of twice ``--width`` × ``--height``, sharper when scaled down).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from dynlens.report.server import TensorBoardServer

ROOT = Path(__file__).resolve().parents[1]


def wait_for_data(server: TensorBoardServer, timeout: float = 60.0) -> list[str]:
    """Wait until the layout and some dynlens scalars are served; return the runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        layout = server.get("/data/plugin/custom_scalars/layout")
        tags = server.get("/data/plugin/scalars/tags")
        if layout and isinstance(tags, dict) and tags:
            run, names = next(iter(tags.items()))
            dynlens = [t for t in names if t.startswith("dynlens/")]
            if dynlens and server.get("/data/plugin/scalars/scalars", run=run, tag=dynlens[0]):
                return list(tags)
        time.sleep(0.5)
    raise SystemExit(f"no dynlens panels served within {timeout:.0f} s: is it a dynlens log?")


def find_chromium(given: str | None) -> str:
    for name in (given, "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise SystemExit("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")


def screenshot(
    chromium: str, url: str, out: Path, width: int, height: int, wait_ms: int, scale: float = 1.0
) -> None:
    with tempfile.TemporaryDirectory(prefix="dynlens-chromium-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            f"--force-device-scale-factor={scale:g}",
            f"--virtual-time-budget={wait_ms}",
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed ({done.returncode}):\n{done.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", nargs="?", default="runs/demo", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tensorboard_panels.png")
    parser.add_argument("--category", default="", help="regex on panel titles (filter box)")
    parser.add_argument("--run", default="", help="regex on run names")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1450)
    parser.add_argument("--wait", type=int, default=20000, help="virtual time budget, ms")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="device pixels per CSS pixel (2: a sharper PNG)"
    )
    parser.add_argument("--chromium", default=None)
    args = parser.parse_args()
    if not args.logdir.is_dir():
        print(f"{args.logdir} is not a directory: run `make demo` first, or pass a log directory")
        return 2
    chromium = find_chromium(args.chromium)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = TensorBoardServer(args.logdir)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    try:
        runs = wait_for_data(server)
        params = {"darkMode": "false"}
        if args.category:
            params["tagFilter"] = args.category
        if args.run:
            params["runFilter"] = args.run
        # TensorBoard's defaults as a user sees them (smoothing 0.6, outliers ignored in the
        # y range: those two are kept in the browser's localStorage, not in the URL).
        url = f"{server.url}/?{urllib.parse.urlencode(params)}#custom_scalars"
        screenshot(chromium, url, args.out, args.width, args.height, args.wait, args.scale)
    finally:
        server.stop()
    print(f"{args.out}: Custom Scalars of {len(runs)} run(s) in {args.logdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
