"""A local TensorBoard server for checking what the live panels show.

Used by the screenshot script and the server test: ``tensorboard --logdir LOGDIR`` on
127.0.0.1 and a free port (loopback only), its URL read from its output, a proxy-free JSON
client for its HTTP API, and a stop that always ends the process.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

#: The ``tensorboard`` executable next to the running Python (the same environment).
TENSORBOARD = Path(sys.executable).with_name("tensorboard")

# `--samples_per_plugin=scalars=0` makes TensorBoard 2.21 serve *no* scalar (0 is taken as a
# sample size), so ask for more points than any run here has instead.
SAMPLES = "--samples_per_plugin=scalars=1000000,text=1000"


class TensorBoardServer:
    """``tensorboard --logdir LOGDIR`` on 127.0.0.1:<free port>; use as a context manager.

    Raises ``RuntimeError`` (with TensorBoard's output) when the binary is missing or the server
    prints no URL within ``timeout`` seconds.
    """

    def __init__(self, logdir: str | Path, timeout: float = 60.0) -> None:
        if not TENSORBOARD.is_file():
            raise RuntimeError(
                f"no tensorboard executable next to {sys.executable}: tensorboard is a dynlens "
                "dependency, reinstall with `pip install -e .`"
            )
        command = [str(TENSORBOARD), "--logdir", str(logdir), "--host", "127.0.0.1"]
        command += ["--port", "0", "--reload_interval", "1", SAMPLES]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            self.url = self._wait_for_url(timeout)
        except BaseException:
            self.stop()
            raise

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # keep reading so the pipe never fills up
            self._lines.put(line)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise RuntimeError("tensorboard exited:\n" + "".join(self.output)) from None
                continue
            self.output.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if found:
                return found.group(1)
        raise RuntimeError(
            f"tensorboard printed no URL within {timeout:.0f} s:\n" + "".join(self.output)
        )

    def get(self, route: str, **params: str) -> Any:
        """GET ``route`` (e.g. ``/data/plugin/scalars/tags``) and decode its JSON."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with self._opener.open(f"{self.url}{route}{query}", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> TensorBoardServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
