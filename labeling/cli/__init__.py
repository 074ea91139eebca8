"""The `prefloop` console script: one subcommand per job, each a thin wrapper over one library call.

Each command module exposes `register(subparsers, common)`; heavy imports (torch, gradio)
happen inside the handlers so that `prefloop --help` and the store commands stay fast.
"""

from __future__ import annotations

import argparse
import sys

from labeling.cli import (
    demo_command,
    eval_command,
    export_command,
    generate_command,
    judge_command,
    loop_command,
    queue_command,
    serve_command,
    simulate_command,
    stats_command,
    store_commands,
    train_command,
    users_command,
)
from labeling.cli.arguments import ArgumentsError, CheckingParser, build
from labeling.cli.common import CliError

# In the order `prefloop --help` lists them.
COMMAND_MODULES = [
    store_commands,
    stats_command,
    export_command,
    users_command,
    generate_command,
    judge_command,
    eval_command,
    train_command,
    loop_command,
    simulate_command,
    queue_command,
    serve_command,
    demo_command,
]


__all__ = ["COMMAND_MODULES", "ArgumentsError", "build_parser", "check_arguments", "main"]


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The whole CLI; subcommand parsers are made of `parser_class` too (argparse's default)."""
    return build(COMMAND_MODULES, parser_class)


def check_arguments(argv: list[str]) -> argparse.Namespace:
    """Parse `prefloop ARGV` without exiting or printing: ArgumentsError says what is wrong."""
    return build_parser(CheckingParser).parse_args(argv)


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
