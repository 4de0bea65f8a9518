"""The ``dynlens`` command line."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynlens", description="Training-dynamics instrumentation for PyTorch Lightning."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train grokking vs memorisation on modular addition and compare the runs"
    )
    demo.add_argument("--logdir", default="runs/demo", help="TensorBoard log directory")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split and the weights")

    report = commands.add_parser(
        "report",
        help="summarise logged runs from their TensorBoard event files",
        description=(
            "Find every run (directory holding TensorBoard event files) under LOGDIR, read every "
            "scalar point, and summarise what the dynlens monitors logged: one table per monitor. "
            "Exits non-zero only when nothing at all could be read."
        ),
    )
    report.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="log or run directory")
    report.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    report.add_argument(
        "--plot", metavar="DIR", help='also write PNG figures (needs pip install "dynlens[plot]")'
    )
    report.add_argument(
        "--prefix", default="dynlens", metavar="NAME", help="the monitors' key prefix (dynlens)"
    )
    report.add_argument(
        "--threshold",
        type=float,
        default=0.99,
        metavar="TAU",
        help="accuracy that counts as memorised/generalised (GrokkingMonitor's threshold, 0.99)",
    )
    report.add_argument(
        "--grokking-delay",
        type=int,
        default=1000,
        metavar="STEPS",
        help="smallest delay classified as grokking (GrokkingMonitor's grokking_delay, 1000)",
    )
    return parser


def _console() -> Console:
    """The report's console: rich's own on a terminal; into a pipe or file, plain text 160
    columns wide (unless ``COLUMNS`` says otherwise), so no table cell is cut short."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def run_report(args: argparse.Namespace, console: Console | None = None) -> int:
    """``dynlens report``: tables to the console, optional JSON and figures; the exit status."""
    from .report import Options, build_report

    console = console or _console()
    if not 0.0 < args.threshold <= 1.0:
        console.print(f"[red]error:[/] --threshold must be in (0, 1], got {args.threshold}")
        return 2
    if args.grokking_delay < 0:
        console.print(f"[red]error:[/] --grokking-delay must be >= 0, got {args.grokking_delay}")
        return 2
    if args.plot:
        from .report.plots import PlotError, require_matplotlib

        try:
            require_matplotlib()  # before reading anything: say at once what is missing
        except PlotError as exc:
            console.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
            return 1
    options = Options(
        prefix=args.prefix.strip("/") or "dynlens",
        threshold=args.threshold,
        grokking_delay=args.grokking_delay,
    )
    report = build_report(args.logdirs, options, console=console)
    console.print(report)
    if not report.readable:
        return 1
    try:
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
            written_to = Text.assemble("summary written to ", (str(path), "bold"))
            console.print(written_to, soft_wrap=True)
        if args.plot:
            from .report.plots import plot_report

            written = plot_report(report, args.plot)
            figures = f"{len(written)} figure{'s' * (len(written) != 1)} written to "
            console.print(Text.assemble(figures, (str(args.plot), "bold")), soft_wrap=True)
    except OSError as exc:
        console.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo  # imports Lightning and torch: only when needed

        run_demo(args.logdir, seed=args.seed)
    elif args.command == "report":
        return run_report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
