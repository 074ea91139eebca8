"""The commands an admin may start from the browser, as the app's job manager reads them.

The app checks a web job's arguments with the CLI's own parsers, but it does not import
labeling.cli: `prefloop serve` is what starts the app, so that import would close a circle.
`prefloop serve` hands the app JOB_COMMAND_LINE instead: `prefloop` with the generate, judge
and train subcommands only (labeling.app.jobs.JOB_COMMANDS), built like the whole CLI.
"""

from __future__ import annotations

import argparse

from labeling.app.job_policy import CommandLine
from labeling.cli import generate_command, judge_command, train_command
from labeling.cli.arguments import CheckingParser, build

JOB_MODULES = (generate_command, judge_command, train_command)


def build_job_parser(
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    return build(JOB_MODULES, parser_class)


def check_job_arguments(argv: list[str]) -> argparse.Namespace:
    """Parse `prefloop ARGV` (a job command) without exiting or printing: ArgumentsError says
    what is wrong."""
    return build_job_parser(CheckingParser).parse_args(argv)


JOB_COMMAND_LINE = CommandLine(build_parser=build_job_parser, check_arguments=check_job_arguments)
