"""The ``dynlens`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo  # imports Lightning and torch: only when needed

        run_demo(args.logdir, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
