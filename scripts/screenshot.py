"""Screenshot TensorBoard's Custom Scalars tab (the dynlens panels) into ``docs/``.

Starts the venv's ``tensorboard`` on ``LOGDIR`` (default ``runs/demo``, from ``make demo``) on
127.0.0.1 and a free port, waits until it serves the runs' custom-scalars layout and scalars,
then loads the Custom Scalars tab in headless Chromium and saves a PNG. The server is always
stopped, and Chromium runs with a fresh profile, no network services and no sandbox (it runs as
root in the project's machines). Needs Debian's ``chromium`` package
(``apt-get install -y chromium``) or ``--chromium PATH``.

    python scripts/screenshot.py [LOGDIR] [--out docs/tensorboard_panels.png] [--wait 20000]

``--category`` keeps only panels whose title matches a regex (TensorBoard's own filter box),
e.g. ``--category grokking``; ``--run`` only runs matching a regex.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TENSORBOARD = Path(sys.executable).with_name("tensorboard")


class TensorBoard:
    """``tensorboard --logdir LOGDIR`` on 127.0.0.1:<free port>, stopped on exit."""

    def __init__(self, logdir: Path, timeout: float = 60.0) -> None:
        if not TENSORBOARD.is_file():
            raise SystemExit(f"no tensorboard binary next to {sys.executable}: pip install -e .")
        self.process = subprocess.Popen(
            [
                str(TENSORBOARD),
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--reload_interval",
                "1",
                # 0 would serve no scalar at all in TensorBoard 2.21; ask for every point instead
                "--samples_per_plugin=scalars=1000000",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.url = self._wait_for_url(timeout)

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if m:
                return m.group(1)
        self.stop()
        raise SystemExit("tensorboard did not start:\n" + "".join(seen))

    def get(self, route: str, **params: str) -> object:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with self.opener.open(f"{self.url}{route}{query}", timeout=10) as response:
            return json.loads(response.read())

    def wait_for_data(self, timeout: float = 60.0) -> list[str]:
        """Wait until the layout and some dynlens scalars are served; return the runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            layout = self.get("/data/plugin/custom_scalars/layout")
            tags = self.get("/data/plugin/scalars/tags")
            if layout and isinstance(tags, dict) and tags:
                run, names = next(iter(tags.items()))
                dynlens = [t for t in names if t.startswith("dynlens/")]
                if dynlens and self.get("/data/plugin/scalars/scalars", run=run, tag=dynlens[0]):
                    return list(tags)
            time.sleep(0.5)
        raise SystemExit(f"no dynlens panels served within {timeout:.0f} s: is it a dynlens log?")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def find_chromium(given: str | None) -> str:
    for name in (given, "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise SystemExit("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")


def screenshot(chromium: str, url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
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
    parser.add_argument("--chromium", default=None)
    args = parser.parse_args()
    if not args.logdir.is_dir():
        print(f"{args.logdir} is not a directory: run `make demo` first, or pass a log directory")
        return 2
    chromium = find_chromium(args.chromium)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = TensorBoard(args.logdir)
    try:
        runs = server.wait_for_data()
        params = {"darkMode": "false"}
        if args.category:
            params["tagFilter"] = args.category
        if args.run:
            params["runFilter"] = args.run
        # TensorBoard's defaults as a user sees them (smoothing 0.6, outliers ignored in the
        # y range: those two are kept in the browser's localStorage, not in the URL).
        url = f"{server.url}/?{urllib.parse.urlencode(params)}#custom_scalars"
        screenshot(chromium, url, args.out, args.width, args.height, args.wait)
    finally:
        server.stop()
    print(f"{args.out}: Custom Scalars of {len(runs)} run(s) in {args.logdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
