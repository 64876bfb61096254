"""Turn a frozen config dataclass into click options, so the dataclass *is* the CLI.

Each field becomes `--field-name` with the field's default and its `metadata["help"]`;
`metadata["argument"]` makes it positional, `metadata["choices"]` restricts values. Bools are
`--flag/--no-flag` switches. A field without a default is a required option. A field whose type is
itself a config dataclass (distill's `loss: LossConfig`) contributes its fields as options of the
same command, so each option is declared once, where it belongs. The command function receives
the config instance.

The other way round, `options(cfg)` gives a config's flat option values (what `build` takes
back) and `to_argv(cfg)` the command line that recreates it, so scripts and multi-run helpers
launch the same path users run.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from alignti.errors import AlignTIError

Leaf = tuple[tuple[str, ...], dataclasses.Field, Any]  # (path of field names, the field, its type)


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `Optional[str]` -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _is_list(tp: Any) -> bool:
    base = _base_type(tp)
    return base is list or typing.get_origin(base) in (list, tuple)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@functools.cache
def leaves(config_cls: type) -> tuple[Leaf, ...]:
    """Every option of `config_cls`, nested config dataclasses flattened (names stay unique)."""
    hints = typing.get_type_hints(config_cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(config_cls):
        if not f.init or f.metadata.get("cli_skip"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [((f.name, *path), g, t) for path, g, t in leaves(tp)]
        else:
            out.append(((f.name,), f, tp))
    names = [path[-1] for path, _, _ in out]
    assert len(names) == len(set(names)), f"{config_cls.__name__}: option names repeat: {names}"
    return tuple(out)


def build(config_cls: type, values: dict[str, Any]) -> Any:
    """`config_cls` from flat option values; options not given take their defaults, unknown ones are
    an AlignTIError naming them."""
    unknown = sorted(set(values) - {path[-1] for path, _, _ in leaves(config_cls)})
    if unknown:
        raise AlignTIError(f"unknown option(s): {', '.join('--' + n.replace('_', '-') for n in unknown)}")
    return _build(config_cls, values)


def _build(config_cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(config_cls)
    kwargs = {}
    for f in dataclasses.fields(config_cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values)
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = list(value) if isinstance(value, tuple) else value
    return config_cls(**kwargs)


def options(cfg: Any) -> dict[str, Any]:
    """A config's flat option values: `build(type(cfg), options(cfg)) == cfg`."""
    out = {}
    for path, _, _ in leaves(type(cfg)):
        value = cfg
        for name in path:
            value = getattr(value, name)
        out[path[-1]] = value
    return out


def to_argv(cfg: Any) -> list[str]:
    """The command-line arguments that give `cfg` back (options that differ from their defaults)."""
    argv, positional = [], []
    values = options(cfg)
    for path, f, tp in leaves(type(cfg)):
        value, flag = values[path[-1]], "--" + path[-1].replace("_", "-")
        if _has_default(f) and value == _default(f):
            continue
        if value is None:
            raise ValueError(f"{flag}: None differs from the default {_default(f)!r} and has no command-line form")
        if f.metadata.get("argument"):
            positional += [str(v) for v in value] if _is_list(tp) else [str(value)]
        elif _base_type(tp) is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif _is_list(tp):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv + positional


def _param(f: dataclasses.Field, tp: Any) -> Callable:
    meta = f.metadata
    name = f.name.replace("_", "-")
    base = _base_type(tp)
    required = not _has_default(f)
    # click treats an explicit default=None as a given value: a required option gets no default at all
    default = {} if required else {"default": _default(f)}
    if "choices" in meta:
        ctype: Any = click.Choice(list(meta["choices"]))
    elif _is_list(tp):
        if meta.get("argument"):
            return click.argument(f.name, nargs=-1)
        return click.option(f"--{name}", f.name, multiple=True, default=_default(f) or (), help=meta.get("help"))
    else:
        ctype = {int: int, float: float, str: str}.get(base, str)
    if meta.get("argument"):
        return click.argument(f.name, type=ctype, required=required, **default)
    if base is bool:
        return click.option(f"--{name}/--no-{name}", f.name, show_default=True, help=meta.get("help"), **default)
    return click.option(f"--{name}", f.name, type=ctype, required=required,
                        show_default=not required and default["default"] is not None, help=meta.get("help"),
                        **default)


def from_dataclass(config_cls: type) -> Callable:
    """Decorator: add one click parameter per option; call the command with the built config."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(build(config_cls, kwargs))

        for _, f, tp in reversed(leaves(config_cls)):
            command = _param(f, tp)(command)
        return command

    return wrap
