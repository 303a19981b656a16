"""Dataclass fields as command-line flags and config-file keys, declared once.

``option(default, help, group=...)`` puts a flag's default, help text, argument group,
choices and aliases in the field's metadata; from that one declaration come the argparse
argument (``build_parser``), the coercion of JSON/YAML values to the field's type
(``load_config_file``, ``check_types``) and the README's flag table (``flag_table``).
Every user mistake ends as a ``ConfigError`` naming the flag or key (one ``error:`` line,
exit code 2), never as an argparse usage dump or a traceback from deep inside torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

INT64 = (-(2**63), 2**63)  # every integer flag fits a signed 64-bit integer unless it says otherwise
UINT64 = (0, 2**64)  # seeds: the direction stream and torch take any unsigned 64-bit value


def option(
    default: Any,
    help: str,
    *,
    group: str,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    aliases: Sequence[str] = (),
    shown: str | None = None,
    bounds: tuple[int, int] | None = None,
    identity: bool = True,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a flag.

    ``shown`` replaces the ``[default]`` the help text ends with (for values resolved later, e.g.
    "64 for dp-aggzo, else 1"); ``choices`` may be a callable, resolved when the parser is built
    (registries filled at import time); ``bounds`` is [lo, hi) for integers (default: int64);
    ``identity=False`` marks bookkeeping a resumed run may change (``TrainConfig.identity``);
    ``metavar`` names the value in ``--help`` (default: N for integers, X for numbers, the field's name).
    """
    meta = {
        "help": help,
        "group": group,
        "choices": choices,
        "aliases": tuple(aliases),
        "shown": shown,
        "bounds": bounds,
        "identity": identity,
        "metavar": metavar,
    }
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Flag:
    """One option field, resolved: its Python type, whether None is allowed, its choices."""

    name: str
    type: type
    nullable: bool
    default: Any
    help: str
    group: str
    choices: tuple[Any, ...] | None
    aliases: tuple[str, ...]
    shown: str | None
    bounds: tuple[int, int]
    identity: bool
    meta: str | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        return self.meta or {int: "N", float: "X"}.get(self.type, self.name.upper())

    @property
    def default_text(self) -> str | None:
        if self.shown is not None:
            return self.shown
        if self.default is None or self.type is bool:
            return None
        return f"{self.default:g}" if self.type is float else str(self.default)

    def help_text(self) -> str:
        shown = self.default_text
        return f"{self.help} [{shown}]" if shown is not None else self.help

    def coerce(self, value: Any) -> Any:
        """``value`` as this field's type; ValueError with a message that completes "<flag> ..."."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"must be {_KIND[self.type]}, got null")
        converted = _CONVERT[self.type](value, self)
        if self.choices is not None and converted not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        return converted


def _to_bool(value: Any, f: Flag) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"must be true or false, got {value!r}")


def _to_int(value: Any, f: Flag) -> int:
    """Integers, integral floats (JSON's 100.0) and their strings (YAML reads 1e3 as a string)."""
    out: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        out = value
    elif isinstance(value, float) and value.is_integer():
        out = int(value)
    elif isinstance(value, str):
        try:
            out = int(value.strip())
        except ValueError:
            try:
                x = float(value)
            except ValueError:
                x = math.nan
            out = int(x) if x.is_integer() else None
    lo, hi = f.bounds
    if out is None:
        raise ValueError(f"must be an integer, got {value!r}")
    if not lo <= out < hi:
        raise ValueError(f"must be an integer in [{_power(lo)}, {_power(hi)}), got {value!r}")
    return out


def _power(x: int) -> str:
    """-2**63 as "-2^63": bounds read better as powers of two."""
    if x and abs(x) & (abs(x) - 1) == 0 and abs(x) > 2**16:
        return f"{'-' if x < 0 else ''}2^{abs(x).bit_length() - 1}"
    return str(x)


def _to_float(value: Any, f: Flag) -> float:
    """Numbers and numeric strings (YAML 1.1 reads 1e-3, without a dot, as a string)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"must be a number, got {value!r}")


def _to_str(value: Any, f: Flag) -> str:
    """Non-empty: an empty path means the current directory and an empty name nothing, never what was meant."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    if not value:
        raise ValueError("must not be empty (omit it for the default)")
    return value


_CONVERT: dict[type, Callable[[Any, Flag], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def flags(cls: type) -> list[Flag]:
    """The option fields of dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "group" not in f.metadata:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        base = [a for a in args if a is not type(None)]
        if len(base) != 1 or base[0] not in _CONVERT:
            raise TypeError(f"{cls.__name__}.{f.name}: option types are bool, int, float, str (or None), not {hint}")
        m = f.metadata
        choices = m["choices"]() if callable(m["choices"]) else m["choices"]
        out.append(
            Flag(
                name=f.name,
                type=base[0],
                nullable=len(args) > 1,
                default=f.default,
                help=m["help"],
                group=m["group"],
                choices=tuple(choices) if choices is not None else None,
                aliases=m["aliases"],
                shown=m["shown"],
                bounds=m["bounds"] or INT64,
                identity=m["identity"],
                meta=m["metavar"],
            )
        )
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one ``error:`` line) instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        # "argument -K/--num-directions: must be ..." -> "--num-directions must be ...", as validate words it
        m = re.fullmatch(r"argument (\S+): (.*)", message, flags=re.DOTALL)
        if m:
            names = m.group(1).split("/")
            message = f"{next((n for n in names if n.startswith('--')), names[0])} {m.group(2)}"
        raise ConfigError(message)


def build_parser(cls: type, groups: dict[str, str], **kwargs: Any) -> argparse.ArgumentParser:
    """An argparse parser with one argument per option field of ``cls``, in ``groups`` (key: title).

    Arguments default to "not given" (absent from the namespace), so a config file's values
    are overridden only by flags actually on the command line.
    """
    p = _Parser(argument_default=argparse.SUPPRESS, **kwargs)
    sections = {key: p.add_argument_group(title) for key, title in groups.items()}
    for f in flags(cls):
        if f.group not in sections:
            raise KeyError(f"{cls.__name__}.{f.name}: unknown group {f.group!r} (known: {', '.join(groups)})")
        names = [*f.aliases, f.flag]
        help_text = f.help_text().replace("%", "%%")
        if f.type is bool:
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            sections[f.group].add_argument(*names, dest=f.name, action=action, help=help_text)
            continue
        sections[f.group].add_argument(
            *names,
            dest=f.name,
            type=_cli_type(f),
            choices=f.choices,
            metavar=None if f.choices else f.metavar,
            help=help_text,
        )
    return p


def _cli_type(f: Flag) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return f.coerce(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = f.type.__name__  # argparse names the type in some of its messages
    return convert


def load_config_file(cls: type, path: str) -> dict[str, Any]:
    """Keys of a JSON or YAML file (underscored or dashed), each coerced to its field's type."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = file.read_text()
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {path} could not be parsed: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return coerce_mapping(cls, data, f"config file {path}")


def coerce_mapping(cls: type, data: dict, where: str) -> dict[str, Any]:
    """``data`` with keys normalised and values coerced; unknown keys and wrong types are refused."""
    by_name = {f.name: f for f in flags(cls)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            close = difflib.get_close_matches(name, by_name, n=1)
            hint = f"did you mean {close[0]}?" if close else "the keys are the flags' names, see --help"
            raise ConfigError(f"{where}: unknown key {key!r} ({hint})")
        try:
            values[name] = by_name[name].coerce(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key} {exc}") from None
    return values


def check_types(obj: Any) -> None:
    """Coerce every option field of dataclass instance ``obj`` in place (a config built in Python)."""
    for f in flags(type(obj)):
        try:
            setattr(obj, f.name, f.coerce(getattr(obj, f.name)))
        except ValueError as exc:
            raise ConfigError(f"{f.flag} {exc}") from None


def flag_table(cls: type, groups: dict[str, str]) -> str:
    """The flags of ``cls`` as Markdown, one table per group (the README's flag reference)."""
    out = []
    for key, title in groups.items():
        rows = [f for f in flags(cls) if f.group == key]
        if not rows:
            continue
        out += [f"**{title[0].upper()}{title[1:]}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for f in rows:
            names = ", ".join(f"`{n}`" for n in (*f.aliases, f.flag))
            meaning = _md(f.help) + (f"; one of: {', '.join(f'`{c}`' for c in f.choices)}" if f.choices else "")
            if f.shown is not None:
                default = _md(f.shown)
            elif f.type is bool:
                default = "off" if f.default is False else "on"
            else:
                default = f"`{f.default_text}`" if f.default is not None else "—"
            out.append(f"| {names} | {default} | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _md(text: str) -> str:
    """Prose for a Markdown table cell: pipes escaped, <placeholders> kept visible."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
