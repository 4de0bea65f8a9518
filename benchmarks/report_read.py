"""Reading speed of ``dynlens report`` against tbparse's ``SummaryReader`` on the same directory.

Writes (once, cached under ``--cache``) a log directory of ``--runs`` runs × ``--tags`` scalar tags
× ``--steps`` steps with ``torch.utils.tensorboard.SummaryWriter`` — the default 20 × 50 × 10,000
is ten million points and takes several minutes to write — then, in one process, alternating:

* dynlens: :func:`dynlens.report.reader.find_runs` + :func:`~dynlens.report.reader.read_run` of
  every run (every point, both CRCs checked, protobuf parsing), and the whole report
  (:func:`dynlens.report.build_report`: reading plus every summary);
* tbparse: ``SummaryReader(logdir, extra_columns={"dir_name"}).scalars`` (every point of every
  run in one DataFrame; tbparse reads through TensorBoard's ``EventAccumulator``).

Both must return every point; the script checks the counts and prints the ratio of median wall
times (tbparse / dynlens: above 1 means dynlens is faster). tbparse is a benchmark-only
dependency, never a dynlens one: ``pip install tbparse``.

    python benchmarks/report_read.py [--runs 20] [--tags 50] [--steps 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "dynlens-bench-report-read"


def generate(logdir: Path, runs: int, tags: int, steps: int) -> None:
    """Write the benchmark directory (skipped when a complete one with this shape exists)."""
    shape = {"runs": runs, "tags": tags, "steps": steps}
    marker = logdir / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return
    from torch.utils.tensorboard import SummaryWriter

    if logdir.exists():
        shutil.rmtree(logdir)
    start = time.perf_counter()
    names = [f"dynlens/bench/quantity_{k:02d}" for k in range(tags)]
    for r in range(runs):
        writer = SummaryWriter(str(logdir / f"run_{r:02d}"), max_queue=10_000, flush_secs=600)
        for step in range(steps):
            for k, name in enumerate(names):
                writer.add_scalar(name, math.sin(0.001 * step + k + r), step)
        writer.close()
        print(f"  wrote run {r + 1}/{runs} ({time.perf_counter() - start:.0f} s)", flush=True)
    marker.write_text(json.dumps(shape))


def read_dynlens(logdir: Path) -> int:
    from dynlens.report.reader import find_runs, read_run

    runs, _ = find_runs([logdir])
    return sum(read_run(directory, name).num_points for name, directory in runs)


def report_dynlens(logdir: Path) -> int:
    from dynlens.report import build_report

    return sum(r.points for r in build_report([logdir]).runs)


def read_tbparse(logdir: Path) -> int:
    from tbparse import SummaryReader

    return len(SummaryReader(str(logdir), extra_columns={"dir_name"}).scalars)


def timed(fn, logdir: Path) -> tuple[float, int]:
    start = time.perf_counter()
    points = fn(logdir)
    return time.perf_counter() - start, points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tags", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    try:
        import tbparse
    except ImportError:
        print(
            "tbparse is not installed: this benchmark compares against it. Install it into the "
            "benchmark environment (not a dynlens dependency): pip install tbparse",
            file=sys.stderr,
        )
        return 2
    expected = args.runs * args.tags * args.steps
    logdir = args.cache / f"{args.runs}x{args.tags}x{args.steps}"
    print(f"log directory {logdir}: {args.runs} runs × {args.tags} tags × {args.steps:,} steps")
    generate(logdir, args.runs, args.tags, args.steps)
    size = sum(p.stat().st_size for p in logdir.rglob("events.out.tfevents.*"))
    print(f"{expected:,} points, {size / 2**20:.0f} MiB of event files")

    # imports outside the timings (dynlens imports torch, tbparse pandas)
    import tbparse.summary_reader

    import dynlens.report  # noqa: F401

    times: dict[str, list[float]] = {"dynlens read": [], "dynlens report": [], "tbparse": []}
    functions = {
        "dynlens read": read_dynlens,
        "dynlens report": report_dynlens,
        "tbparse": read_tbparse,
    }
    for repeat in range(args.repeats):
        for name, fn in functions.items():
            seconds, points = timed(fn, logdir)
            if points != expected:
                print(f"{name} returned {points:,} points, expected {expected:,}", file=sys.stderr)
                return 1
            times[name].append(seconds)
            print(f"  repeat {repeat + 1}: {name:<15} {seconds:7.2f} s", flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, tbparse {tbparse.__version__}; median of {args.repeats}"
    )
    for name in ("dynlens read", "dynlens report"):
        ratio = median["tbparse"] / median[name]
        print(f"tbparse SummaryReader / {name}: {ratio:.1f}x  (every point: {expected:,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
