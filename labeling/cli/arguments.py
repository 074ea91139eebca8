"""Building `prefloop` parsers from command modules, and parsing without exiting.

Shared by the whole CLI (labeling/cli/__init__.py) and by the web jobs' view of it
(job_commands.py), so both parse with the same subcommand parsers and the same messages.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

from labeling.cli.common import common_parser
from labeling.cli.dataclass_flags import LazySubParsersAction


def build(
    modules: Sequence[ModuleType], parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """`prefloop` with one subcommand per module (each has `register(subparsers, common)`);
    subcommand parsers are made of `parser_class` too (argparse's default). A module may defer
    adding its flags to the subcommand's first use (dataclass_flags.deferred)."""
    parser = parser_class(prog="prefloop", description="Human feedback collection and RLHF, one loop.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       action=LazySubParsersAction)
    common = common_parser()
    for module in modules:
        module.register(subparsers, common)
    return parser


class ArgumentsError(ValueError):
    """Command-line arguments argparse refuses, as a one-line message instead of an exit."""


class CheckingParser(argparse.ArgumentParser):
    """A parser that raises ArgumentsError where argparse would print and exit."""

    def error(self, message: str):
        raise ArgumentsError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None):
        raise ArgumentsError((message or "").strip() or f"{self.prog}: nothing to run")

    def print_help(self, file=None) -> None:
        raise ArgumentsError(" ".join(self.format_usage().split()))
