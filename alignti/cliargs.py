"""Turn a frozen config dataclass into click options, so the dataclass *is* the CLI.

Each field becomes `--field-name` with the field's default and its `metadata["help"]`;
`metadata["argument"]` makes it positional, `metadata["choices"]` restricts values. Bools are
`--flag/--no-flag` switches. The command function then receives the config instance.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

import click


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `Optional[str]` -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _param(f: dataclasses.Field, tp: Any) -> Callable:
    meta = f.metadata
    name = f.name.replace("_", "-")
    base = _base_type(tp)
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
    # click counts an explicit default=None as a given value and then never enforces required=True.
    given = {"required": True} if required else {"default": default}
    if "choices" in meta:
        ctype: Any = click.Choice(list(meta["choices"]))
    elif base is list or typing.get_origin(base) in (list, tuple):
        if meta.get("argument"):
            return click.argument(f.name, nargs=-1)
        return click.option(f"--{name}", f.name, multiple=True, default=default or (), help=meta.get("help"))
    else:
        ctype = {int: int, float: float, str: str}.get(base, str)
    if meta.get("argument"):
        return click.argument(f.name, type=ctype, required=required)
    if base is bool:
        return click.option(f"--{name}/--no-{name}", f.name, **given, show_default=True, help=meta.get("help"))
    return click.option(f"--{name}", f.name, type=ctype, **given, show_default=default is not None,
                        help=meta.get("help"))


def from_dataclass(config_cls: type) -> Callable:
    """Decorator: add one click parameter per field; call the command with `config_cls(**kwargs)`."""
    hints = typing.get_type_hints(config_cls)

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            for f in dataclasses.fields(config_cls):
                if isinstance(kwargs.get(f.name), tuple):
                    kwargs[f.name] = list(kwargs[f.name])
            return fn(config_cls(**kwargs))

        for f in reversed(dataclasses.fields(config_cls)):
            if f.init and not f.metadata.get("cli_skip"):
                command = _param(f, hints[f.name])(command)
        return command

    return wrap
