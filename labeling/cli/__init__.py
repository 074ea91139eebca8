"""The `prefloop` console script: one subcommand per job, each a thin wrapper over one library call.

Each command module exposes `register(subparsers, common)`; heavy imports (torch, gradio)
happen inside the handlers so that `prefloop --help` and the store commands stay fast.
"""

from __future__ import annotations

import argparse
import sys

from labeling.cli import store_commands
from labeling.cli.common import CliError, common_parser

COMMAND_MODULES = [store_commands]
OPTIONAL_COMMANDS = (
    "stats_command",
    "export_command",
    "users_command",
    "generate_command",
    "judge_command",
    "train_command",
    "serve_command",
    "demo_command",
)


def _optional_modules() -> list:
    # Modules added by later parts of the project register themselves here when present.
    import importlib

    modules = []
    for name in OPTIONAL_COMMANDS:
        try:
            modules.append(importlib.import_module(f"labeling.cli.{name}"))
        except ModuleNotFoundError as error:
            if error.name != f"labeling.cli.{name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefloop", description="Human feedback collection and RLHF, one loop."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_parser()
    for module in COMMAND_MODULES + _optional_modules():
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
