"""Turn a frozen config dataclass into click options, so the dataclass *is* the CLI.

Each field becomes `--field-name` with the field's default and its `metadata["help"]`;
`metadata["argument"]` makes it positional, `metadata["choices"]` restricts values. Bools are
`--flag/--no-flag` switches. A field without a default is a required option. A field whose type is
itself a config dataclass (distill's `loss: LossConfig`) contributes its fields as options of the
same command, so each option is declared once, where it belongs. The command function receives
the config instance.

Every command also takes `--config FILE`: a run file (YAML, or TOML for a `.toml` name) mapping
option names (`kd_weight` or `kd-weight`) to values. Flags given on the command line override the
file; an unknown name is an error naming it. So required-ness is checked after the merge (`build`),
not by click: a required option may come from the file.

The other way round, `options(cfg)` gives a config's flat option values (what `build` takes
back), `to_argv(cfg)` the command line that recreates it, so scripts and multi-run helpers
launch the same path users run, and `write_run_file` a run file `--config` reads back: every run
writes one, so it can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
from click.core import ParameterSource

from alignti.errors import AlignTIError
from alignti.storage.files import write_text_atomic

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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build(config_cls: type, values: dict[str, Any]) -> Any:
    """`config_cls` from flat option values; options not given take their defaults. Unknown and
    missing required options are an AlignTIError naming them."""
    unknown = sorted(set(values) - {path[-1] for path, _, _ in leaves(config_cls)})
    if unknown:
        raise AlignTIError(f"unknown option(s): {', '.join(map(_flag, unknown))}")
    missing = [f.name.upper() if f.metadata.get("argument") else _flag(f.name)
               for path, f, _ in leaves(config_cls) if not _has_default(f) and values.get(path[-1]) is None]
    if missing:
        raise AlignTIError(f"missing {', '.join(missing)} (on the command line or in --config FILE)")
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
    # Never required for click: the value may come from --config FILE (`build` checks after the merge).
    # click treats an explicit default=None as a given value: a required option gets no default at all.
    default = {} if required else {"default": _default(f)}
    shown = meta.get("help", "") + (" [required]" if required else "")
    if "choices" in meta:
        ctype: Any = click.Choice(list(meta["choices"]))
    elif _is_list(tp):
        if meta.get("argument"):
            return click.argument(f.name, nargs=-1)
        return click.option(f"--{name}", f.name, multiple=True, default=_default(f) or (), help=shown)
    else:
        ctype = {int: int, float: float, str: str}.get(base, str)
    if meta.get("argument"):
        return click.argument(f.name, type=ctype, required=False, **default)
    if base is bool:
        return click.option(f"--{name}/--no-{name}", f.name, show_default=True, help=shown, **default)
    return click.option(f"--{name}", f.name, type=ctype, show_default=not required and default["default"] is not None,
                        help=shown, **default)


# ---------------------------------------------------------------- run files (--config FILE)

CONFIG = "config"  # the option every command gets; no config dataclass may have a field of that name
_GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


def read_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """A run file's {option name: value}: YAML, or TOML when the name ends in .toml; names may use
    `-` or `_`. AlignTIError (one line naming the file) if it cannot be read or is not a mapping."""
    where = f"--config {os.fspath(path)}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AlignTIError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        if Path(path).suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise AlignTIError(f"{where}: not valid {'TOML' if Path(path).suffix == '.toml' else 'YAML'} "
                           f"({' '.join(str(e).split())})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise AlignTIError(f"{where}: must map option names to values, got a {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in out:
            raise AlignTIError(f"{where}: option {_flag(name)} is given twice")
        out[name] = value
    return out


def config_values(ctx: click.Context, config_cls: type, path: str) -> dict[str, Any]:
    """The run file's values, each checked and converted by its option's click type, as if given as
    a flag (`lr: 2e-5` is a string to YAML, a float here; a choice outside its list is refused)."""
    values = read_run_file(path)
    params = {p.name: p for p in ctx.command.params}
    unknown = sorted(n for n in values if n == CONFIG or n not in {p[-1] for p, _, _ in leaves(config_cls)})
    if unknown:
        raise AlignTIError(f"--config {path}: unknown option(s): {', '.join(map(_flag, unknown))}")
    out = {}
    for name, value in values.items():
        param = params[name]
        if value is not None and (param.multiple or param.nargs == -1) and not isinstance(value, list):
            value = [value]
        try:
            out[name] = param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise AlignTIError(f"--config {path}: {_flag(name)}: {e.format_message()}") from None
    return out


def write_run_file(cfg: Any, path: str | os.PathLike, command: str, note: str = "") -> Path:
    """Write `cfg`'s options as a run file `alignti COMMAND --config PATH` reads back, with a
    commented header saying so (and `note`, one more comment line), atomically."""
    path = Path(path)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in options(cfg).items()}
    header = (f"# alignti {command}: the options of the run started {time.strftime('%Y-%m-%d %H:%M:%S')} in "
              f"{os.getcwd()}\n"
              f"# (relative paths are relative to that directory). Run it again with\n"
              f"#   alignti {command} --config {path}\n"
              f"# options given as flags after it override the values below (e.g. another --out).\n"
              + (f"# {note}\n" if note else ""))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, header + yaml.safe_dump(values, sort_keys=False, default_flow_style=False))
    except OSError as e:
        raise AlignTIError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def from_dataclass(config_cls: type) -> Callable:
    """Decorator: add one click parameter per option and `--config FILE`; call the command with the
    config built from the file's values overridden by the flags given on the command line."""
    assert CONFIG not in {path[-1] for path, _, _ in leaves(config_cls)}, f"{config_cls.__name__}: --{CONFIG}"

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            ctx = click.get_current_context()
            path = kwargs.pop(CONFIG)
            given = {k: v for k, v in kwargs.items() if ctx.get_parameter_source(k) in _GIVEN}
            values = {**config_values(ctx, config_cls, path), **given} if path else given
            return fn(build(config_cls, values))

        for _, f, tp in reversed(leaves(config_cls)):
            command = _param(f, tp)(command)
        return click.option(f"--{CONFIG}", CONFIG, type=click.Path(dir_okay=False), default=None, help=(
            "run file (YAML, or TOML if it ends in .toml) of option names and values, e.g. one a previous run "
            "wrote; flags given here override it"))(command)

    return wrap
