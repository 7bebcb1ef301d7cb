"""Command-line options declared on the config dataclasses' fields (`lcpaq.config`).

A field's ``metadata`` holds an `Option`: its flag, help, group and how the flag's text becomes the
field's value. The field itself holds the name, type and default. `lcpaq.cli` generates argparse from
these declarations (`add_arguments`) and builds the dataclasses back from the parsed namespace
(`build`), so every option is written once. Nothing here knows a particular option.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Help sections of the command line.
MODEL_GROUP = "model and calibration"
ANALYSIS_GROUP = "analysis"
PAIR_GROUP = "inter-layer terms (METHOD §1c; off by default)"
CORRECTION_GROUP = "statistics correction"
ALLOCATION_GROUP = "allocation"

#: Metadata key of a field's `Option`.
OPTION = "lcpaq.option"
#: Metadata key of a dataclass-valued field (``AnalysisConfig.scheme``) whose own fields are options:
#: a mapping from the inner dataclass's field names to their `Option`.
NESTED = "lcpaq.nested_options"


@dataclass(frozen=True)
class Option:
    """How one dataclass field appears on the command line."""

    flag: str
    help: str | None = None
    #: Title of the help section the flag is listed under (None: the parser's own options).
    group: str | None = None
    #: Allowed values; None takes a ``Literal`` field's values.
    choices: Sequence[str] | None = None
    metavar: str | None = None
    #: Required by subcommands that need it (analyze, allocate, search); ``run`` makes it optional
    #: because ``--config`` can supply it.
    required: bool = False
    #: The flag may be repeated (argparse ``append``; the field takes all of them).
    repeat: bool = False
    #: argparse's ``type`` when the field's own type is not it (a validating converter).
    type: Callable[[str], Any] | None = None
    #: The parsed flag value → the field's value (runs after argparse, so errors are InputError).
    parse: Callable[[Any], Any] | None = None
    #: The field's default → the flag's default (the inverse of ``parse``).
    show: Callable[[Any], Any] | None = None
    #: May be given together with ``lcpaq run --config`` (it amends the file's configuration).
    amends_config: bool = False

    @property
    def dest(self) -> str:
        """The attribute of the parsed namespace."""
        return self.flag.removeprefix("--").replace("-", "_")


def option(flag: str, **settings: Any) -> dict[str, Option]:
    """A field's metadata declaring its flag: ``field(default=…, metadata=option("--x", help=…))``."""
    return {OPTION: Option(flag, **settings)}


@dataclass(frozen=True)
class Declared:
    """One option with the field it sets: where it lives, its type and default."""

    option: Option
    field: str
    #: The field's type (annotations resolved).
    kind: Any
    #: The field's default, `dataclasses.MISSING` when it has none.
    default: Any
    #: The field of the outer dataclass holding this field's dataclass (``"scheme"``), or None.
    outer: str | None = None

    @property
    def flag_default(self) -> Any:
        """The default of the flag: what argparse stores when it is not given."""
        if self.default is dataclasses.MISSING:
            return None
        return self.option.show(self.default) if self.option.show else self.default


def declared_options(cls: type, names: Iterable[str] | None = None) -> list[Declared]:
    """The options of dataclass ``cls`` in field order (or the named fields, in that order)."""
    found: list[Declared] = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if OPTION in field.metadata:
            found.append(
                Declared(field.metadata[OPTION], field.name, hints[field.name], field.default)
            )
        elif NESTED in field.metadata:
            inner_hints = typing.get_type_hints(type(field.default))
            for name, inner in field.metadata[NESTED].items():
                default = getattr(field.default, name)
                found.append(Declared(inner, name, inner_hints[name], default, outer=field.name))
    if names is None:
        return found
    by_field = {declared.field: declared for declared in found}
    return [by_field[name] for name in names]


def _argparse_settings(declared: Declared, require: bool) -> dict[str, Any]:
    option = declared.option
    kind = _without_none(declared.kind)
    settings: dict[str, Any] = {"help": option.help, "default": declared.flag_default}
    if kind is bool:
        settings["action"] = "store_true"
        return settings
    if option.repeat:
        settings["action"] = "append"
    elif option.type is not None or kind in (int, float, Path):
        settings["type"] = option.type or kind
    choices = option.choices
    if choices is None and typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
    if choices is not None:
        settings["choices"] = list(choices)
    if option.metavar:
        settings["metavar"] = option.metavar
    if option.required and require:
        settings["required"] = True
    return settings


def _without_none(kind: Any) -> Any:
    """``int | None`` → ``int``; other types unchanged."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def add_arguments(
    parser: argparse.ArgumentParser,
    options: Iterable[Declared],
    *,
    require: bool = True,
    group: str | None = None,
    grouped: bool = True,
    helps: Mapping[str, str] | None = None,
) -> None:
    """Add the declared flags to ``parser``, under their own help groups or all under ``group``
    (``grouped=False``: among the parser's own options).

    ``require``: whether options declared required are (False where ``--config`` may supply them).
    ``helps``: help texts that replace the declared ones for this parser, by field name.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for declared in options:
        title = (group or declared.option.group) if grouped else None
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if title is not None:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        settings = _argparse_settings(declared, require)
        if helps and declared.field in helps:
            settings["help"] = helps[declared.field]
        target.add_argument(declared.option.flag, **settings)


def build(cls: type, args: argparse.Namespace) -> Any:
    """An instance of dataclass ``cls`` from the flags in ``args`` that set its fields.

    Fields whose flag the subcommand does not have keep their defaults; a subcommand's own flag with
    the same name as an option (``search --seed``) sets that option too.
    """
    values: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {}
    for declared in declared_options(cls):
        if not hasattr(args, declared.option.dest):
            continue
        value = getattr(args, declared.option.dest)
        if declared.option.parse is not None:
            value = declared.option.parse(value)
        if declared.outer is None:
            values[declared.field] = value
        else:
            inner.setdefault(declared.outer, {})[declared.field] = value
    defaults: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(cls)}
    for outer, changes in inner.items():
        values[outer] = dataclasses.replace(defaults[outer], **changes)
    return cls(**values)


def given_flags(options: Iterable[Declared], args: argparse.Namespace) -> list[str]:
    """The flags of ``options`` whose value in ``args`` differs from the flag's default."""
    return [
        declared.option.flag
        for declared in options
        if getattr(args, declared.option.dest, None) != declared.flag_default
    ]
