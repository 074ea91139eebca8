"""Command-line flags generated from dataclass fields: each setting is declared once, on its field.

    add_flags(parser, SamplingConfig, [Flag("max_new_tokens"), Flag("temperature")])
    # --max-new-tokens INT   most tokens per response (default: 256)

A `Flag` names a field; the flag's type comes from the field's annotation (int, float, str,
`X | None`, `Literal[...]` as choices; a bool is a `store_true` switch), its help from
`field.metadata["help"]`, its argparse default from the field's default, and the help ends
with that default, formatted once, here (`(default: 0.7)`; nothing for None or a switch's
False, whose help says what "unset" means). A Flag may narrow what the field's annotation
allows (a validating `type`, `choices`, `metavar`, `action`) or, for fields of third-party
classes (TRL's configs) whose help is long, carry a short `help`; it never carries a default
value.

`overrides=True` is for layered settings (`prefloop train`): every flag defaults to None, i.e.
"not given, leave the lower layers alone", and `shown` says where the default comes from
instead (`preset_default`: "the preset's value" when a shipped preset sets the key).

Heavy classes (TRL configs import torch) are only imported when their subcommand is used:
`LazySubParsersAction` fills a subcommand's parser on first use (parsing it, or reading it
through `action.choices`, as the web-job policy does), so `prefloop --help` and the store
commands stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union

CLI_ONLY = "cli-only"  # Flag.section of flags that configure the command, not a dataclass


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag for one dataclass field. Everything but `field` is optional."""

    field: str
    flag: str | None = None  # default: --FIELD-NAME (underscores as dashes); the dest follows the flag
    type: Callable[[str], Any] | None = None  # a parser narrower than the annotation (validation, lists)
    choices: tuple | None = None  # narrower than the annotation's Literal
    metavar: str | None = None
    action: str | type[argparse.Action] | None = None  # e.g. "append"; a bool field is store_true
    help: str | None = None  # only where the field has no (short) help: third-party classes
    shown: str | None = None  # what the default is, in words, where the field's value is not it
    unset: bool = False  # the argparse default is None (the command resolves it), not the field's

    @property
    def option(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


def field_default(field: dataclasses.Field) -> Any:
    """The value a field takes when not given (a default_factory is called); MISSING if required."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def format_default(value: Any) -> str | None:
    """How a default is written in help, the same way for every flag; None: not written."""
    if value is None or value is dataclasses.MISSING or value is False:
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value) if value else None
    return str(value)


def field_types(cls) -> dict[str, Any]:
    """The fields' annotations as types (string annotations evaluated in the class's module)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError, AttributeError):  # an unresolvable annotation in a third-party class
        import sys

        hints = {}
        for f in dataclasses.fields(cls):
            annotation = f.type
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, vars(sys.modules[cls.__module__]))
                except (NameError, TypeError, AttributeError, SyntaxError):
                    annotation = str
            hints[f.name] = annotation
        return hints


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def argument_kwargs(annotation) -> dict:
    """argparse keywords for a value of this annotation: type / choices / action."""
    annotation, _ = _unwrap_optional(annotation)
    if annotation is bool:
        return {"action": "store_true"}
    if typing.get_origin(annotation) is Literal:
        values = typing.get_args(annotation)
        return {"choices": values, "type": type(values[0])}
    if annotation in (int, float, str):
        return {"type": annotation}
    return {}  # anything else arrives as a string (the Flag gives a parser where one is needed)


def get_field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise LookupError(f"{cls.__name__} has no field {name!r}")


def help_for(cls, flag: Flag, *, shown: str | None = None) -> str:
    """The flag's help: the field's (or the Flag's short) text, then its default once."""
    field = get_field(cls, flag.field)
    text = flag.help or field.metadata.get("help") or ""
    default = flag.shown or shown or format_default(field_default(field))
    return with_default(text, default)


def with_default(text: str, default: str | None) -> str:
    """`text (default: DEFAULT)`, the one format of defaults in help ('%' escaped for argparse)."""
    if default is not None:
        text = f"{text} (default: {default})" if text else f"default: {default}"
    return text.replace("%", "%%")


def add_flags(
    parser,
    cls,
    flags: Iterable[Flag],
    *,
    overrides: bool = False,
    shown: Callable[[Flag], str | None] | None = None,
    prefix: str = "",
) -> list[argparse.Action]:
    """Add one argument per Flag, built from `cls`'s field. `overrides`: every default is None
    (settings layers: unset flags change nothing); `shown(flag)`: the default to write instead
    of the field's (e.g. a preset's); `prefix` starts every help (e.g. "openai: ")."""
    hints = field_types(cls)
    actions = []
    for flag in flags:
        field = get_field(cls, flag.field)
        kwargs = argument_kwargs(hints.get(flag.field, str))
        if flag.action is not None:
            kwargs = {"action": flag.action}
        if flag.type is not None:
            kwargs["type"] = flag.type
            kwargs.pop("choices", None)
        if flag.choices is not None:
            kwargs["choices"] = flag.choices
        if flag.metavar is not None:
            kwargs["metavar"] = flag.metavar
        if kwargs.get("action") == "store_true":
            kwargs.pop("type", None)
            kwargs.pop("choices", None)
        default = None if overrides or flag.unset else field_default(field)
        if kwargs.get("action") == "append" and default is not None:
            default = None  # argparse would append to the field's own list; unset is None, read as the field's
        kwargs["default"] = None if default is dataclasses.MISSING else default
        is_switch = kwargs.get("action") == "store_true"
        text = help_for(cls, flag, shown=None if is_switch else (shown(flag) if shown else None))
        if kwargs.get("action") == "append":
            text = text.replace(" (default:", "; repeatable (default:", 1) if "(default:" in text else f"{text}; repeatable"
        text = prefix + text
        actions.append(parser.add_argument(flag.option, dest=flag.dest, help=text, **kwargs))
        actions[-1].field = (cls, flag.field)  # what the flag sets: read by tests and tools
    return actions


def cli_only(parser, *args, help: str = "", shown: str | None = None, **kwargs) -> argparse.Action:
    """A flag that configures the command itself rather than a dataclass field (e.g. --json);
    its default is written the same way as a field's (or `shown`, in words)."""
    default = kwargs.get("default")
    written = shown or (None if kwargs.get("action") in ("append", "store_true") else format_default(default))
    action = parser.add_argument(*args, help=with_default(help, written), **kwargs)
    action.field = CLI_ONLY
    return action


# --------------------------------------------------------------------------- lazy subcommands


class _LazyParsers(dict):
    """name -> parser, filling a parser the first time it is looked up (not when listed)."""

    def __init__(self):
        super().__init__()
        self.pending: dict[int, Callable[[argparse.ArgumentParser], None]] = {}

    def _filled(self, parser):
        populate = self.pending.pop(id(parser), None)
        if populate is not None:
            populate(parser)
        return parser

    def __getitem__(self, name):
        return self._filled(super().__getitem__(name))

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def values(self):
        return [self._filled(parser) for parser in super().values()]

    def items(self):
        return [(name, self._filled(parser)) for name, parser in super().items()]


class LazySubParsersAction(argparse._SubParsersAction):
    """argparse's subcommands, where a subcommand's flags may be added when it is first used."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._name_parser_map = self.choices = _LazyParsers()


def deferred(subparsers, parser: argparse.ArgumentParser, populate: Callable[[argparse.ArgumentParser], None]) -> None:
    """Run `populate(parser)` when the subcommand is first used (at once under plain argparse)."""
    if isinstance(subparsers, LazySubParsersAction):
        subparsers.choices.pending[id(parser)] = populate
    else:
        populate(parser)
