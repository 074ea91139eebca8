"""The `prefloop` console script: one subcommand per job, each a thin wrapper over one library call.

Each command module exposes `register(subparsers, common)`; heavy imports (torch, gradio)
happen inside the handlers so that `prefloop --help` and the store commands stay fast.
"""

from __future__ import annotations

import argparse
import sys

from labeling.cli import (
    demo_command,
    export_command,
    generate_command,
    judge_command,
    serve_command,
    stats_command,
    store_commands,
    train_command,
    users_command,
)
from labeling.cli.common import CliError, common_parser

# In the order `prefloop --help` lists them.
COMMAND_MODULES = [
    store_commands,
    stats_command,
    export_command,
    users_command,
    generate_command,
    judge_command,
    train_command,
    serve_command,
    demo_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefloop", description="Human feedback collection and RLHF, one loop."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_parser()
    for module in COMMAND_MODULES:
        module.register(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CliError as error:
        print(f"prefloop {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prefloop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
