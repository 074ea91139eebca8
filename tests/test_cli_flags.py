"""The flags of `prefloop train|judge|generate` are the config dataclasses' fields, declared once.

Every flag is a field (or a listed CLI-only flag), its help writes its default once and that
default is the field's (or the preset's), and a flag lands in the same setting as the same key
of a YAML config.
"""

from __future__ import annotations

import argparse
import re

import pytest

from alignment.training.methods import METHOD_NAMES
from labeling.cli import build_parser
from labeling.cli.dataclass_flags import CLI_ONLY, field_default, format_default, get_field
from labeling.cli.train_command import FLAG_SETTINGS, overrides_from_args

CLI_ONLY_FLAGS = {
    "judge": {"--db", "--backend", "--rubric", "--criteria-file", "--list-templates", "--no-progress", "--json"},
    "generate": {"--db"},
    # --judge-mode: how the judge reward (grpo, rloo, ppo) compares, not a field of the judge's config
    "train": {"--db", "--model", "--preset", "--config", "--set", "--no-progress", "--eval", "--judge-mode"},
}


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise LookupError(parser.prog)


def _command(parser, name: str, method: str | None = None) -> argparse.ArgumentParser:
    sub = _subparsers(parser)[name]
    return _subparsers(sub)[method] if method else sub


def _flag_actions(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def _commands():
    yield "judge", None
    yield "generate", None
    for method in METHOD_NAMES:
        yield "train", method


@pytest.mark.parametrize(("command", "method"), list(_commands()))
def test_every_flag_is_a_field_or_listed(parser, command, method):
    for action in _flag_actions(_command(parser, command, method)):
        origin = getattr(action, "field", None)
        if origin == CLI_ONLY or action.option_strings[0] == "--db":
            assert action.option_strings[0] in CLI_ONLY_FLAGS[command], action.option_strings
            continue
        assert origin is not None, f"{command} {action.option_strings[0]}: not made from a dataclass field"
        cls, name = origin
        get_field(cls, name)  # the field exists


@pytest.mark.parametrize(("command", "method"), list(_commands()))
def test_help_writes_each_default_once_and_as_the_field_has_it(parser, command, method):
    sub = _command(parser, command, method)
    text = sub.format_help()  # renders
    assert "(default: None)" not in text
    for action in _flag_actions(sub):
        help_text = action.help or ""
        assert help_text.count("(default:") <= 1, (action.option_strings, help_text)
        assert "(default " not in help_text.replace("(default RUNS_DIR", "").replace("(default METHOD", ""), help_text
        written = re.search(r"\(default: (.*)\)$", help_text)
        origin = getattr(action, "field", None)
        if written is None or origin in (None, CLI_ONLY):
            continue
        cls, name = origin
        value = written.group(1)
        if value.startswith("preset's value"):
            assert command == "train"
            continue
        expected = format_default(field_default(get_field(cls, name)))
        if expected is not None and re.fullmatch(r"-?[0-9.e+-]+", value):
            assert value == expected, (action.option_strings, value, expected)


def test_argparse_defaults_are_the_fields(parser):
    from alignment.sampling import SamplingConfig
    from labeling.judge.openai_backend import OpenAIJudgeConfig
    from labeling.judge.runner import JudgeRunConfig

    judge = build_parser().parse_args(["judge"])
    assert judge.timeout == OpenAIJudgeConfig.timeout and judge.max_tokens == OpenAIJudgeConfig.max_tokens
    assert judge.doubt_confidence == JudgeRunConfig.doubt_confidence
    generate = build_parser().parse_args(["generate"])
    assert (generate.max_new_tokens, generate.temperature, generate.seed, generate.batch_size) == (
        SamplingConfig.max_new_tokens, SamplingConfig.temperature, SamplingConfig.seed, SamplingConfig.batch_size)
    assert generate.samples is None and generate.policy is None  # resolved by the command


def test_train_flags_default_to_unset(parser):
    args = build_parser().parse_args(["train", "ppo"])
    assert all(getattr(args, dest, None) is None for dest in FLAG_SETTINGS)
    assert overrides_from_args(args) == []


def test_preset_defaults_are_named_not_copied(parser):
    help_text = _command(parser, "train", "dpo").format_help()
    assert "(default: preset's value)" in " ".join(help_text.split())  # e.g. --learning-rate
    ppo = " ".join(_command(parser, "train", "ppo").format_help().split())
    assert "rollout sampling temperature (0.7)" not in ppo and "(default: 0.7)" in ppo


def test_flags_and_yaml_keys_land_in_the_same_settings(tmp_path):
    import yaml

    from alignment.training.presets import load_yaml, merge, settings_for

    argv = ["train", "dpo", "--beta", "0.3", "--max-steps", "7", "--raters", "human", "--adapter", "dora",
            "--min-agreement", "0.5", "--weighted", "--loss-type", "ipo,hinge", "--output-dir", "out"]
    args = build_parser().parse_args(argv)
    from_flags = settings_for(merge(*overrides_from_args(args)), "dpo")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "dpo": {"beta": 0.3, "loss_type": ["ipo", "hinge"]}, "trainer": {"max_steps": 7},
        "selection": {"rater_kinds": "human", "min_agreement": 0.5, "weighted": True},
        "adapter": {"method": "dora"}, "run": {"output_dir": "out"},
    }))
    from_yaml = settings_for(merge(load_yaml(config)), "dpo")
    for section in ("model", "adapter", "selection", "run", "trainer"):
        assert from_flags[section] == from_yaml[section], section


def test_every_train_flag_names_a_setting_its_section_builds(parser):
    from labeling.cli.train_command import section_classes

    for method in METHOD_NAMES:
        classes = section_classes(method)
        sub = _command(parser, "train", method)
        for action in _flag_actions(sub):
            if action.dest in FLAG_SETTINGS:
                section, key = FLAG_SETTINGS[action.dest]
                get_field(classes[section], key)
                assert action.field == (classes[section], key)


def test_prefloop_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from labeling.cli import build_parser; build_parser().format_help(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
