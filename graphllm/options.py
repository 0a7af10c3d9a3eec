"""Options declared once: a config dataclass's fields carry their flag, help, choices and checks.

    @dataclass(kw_only=True, slots=True)
    class Layout:
        tp: int = option(1, minimum=1, help="tensor-parallel ranks")

From that one declaration come the argparse flag (`add_flags`; `--help` shows the default), the
value read back from the parsed flags (`from_flags`), the validation of a value however it arrives —
flag, Python or plan.json (`check_fields`, called by the dataclass's `__post_init__`), the JSON form
(`to_dict` / `from_dict`, which refuses unknown or wrongly-typed fields) and the documentation table
(`markdown_table`; docs/options.md is generated from it and a test keeps it current).

A field whose default is a dataclass is a *section* (`section(Layout, title=...)`): its options become
an argument group, and its JSON form a nested object. A config class may set `FLAG_PREFIX` (a ClassVar:
`"npu"` makes `mode` the flag `--npu-mode`). Field types understood: bool, int, float, str,
Literal[...], list[int] / list[str] / tuple[int, ...], and `X | None`.
A job file (`--config`, graphllm/job_config.py) sets them too: `value_from_file` checks its values.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Literal, Sequence

from graphllm.errors import GraphllmError

OPTION = "graphllm_option"
SECTION = "graphllm_section"
FILE_VALUES = "config:values"
"""Namespace attribute: {dest: value} from a --config file (graphllm/job_config.py); a flag given wins."""
DECLARED = "graphllm_declared"
"""Attribute `add_flags` sets on each argparse action: the option's Declared."""


@dataclass(frozen=True, slots=True)
class Option:
    """How one config field appears to users (the field's default and type come from the dataclass)."""

    help: str
    flag: str | None = None
    """The command-line flag; default `--<field-name>` with `_` as `-` (a section may add a prefix)."""
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    """Allowed values (a callable for choices known only at run time, e.g. registered backends)."""
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any], None] | None = None
    """Extra validation; raises GraphllmError naming the flag."""
    cli: bool = True
    """False: settable from Python and plan.json only."""
    metavar: str | None = None
    repeat: bool = False
    """A list option whose flag may be given several times (each value may also be comma-separated)."""
    nargs: str | None = None
    """A list option that takes several command-line words (`--data 0.7 A 0.3 B`: nargs "+")."""

    def allowed(self) -> list[Any] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


@dataclass(frozen=True, slots=True)
class Section:
    title: str


def option(default: Any, *, help: str, **kw: Any) -> Any:
    """A dataclass field declared as an option (see Option for the keywords)."""
    meta = {OPTION: Option(help=help, **kw)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, *, title: str) -> Any:
    """A dataclass field holding a nested config section (defaults: `cls()`)."""
    return dataclasses.field(default_factory=cls, metadata={SECTION: Section(title=title)})


# -- reading a config class -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Declared:
    """One option of a config class, with where it lives (`path`) and its command-line name."""

    path: tuple[str, ...]
    name: str
    type: Any
    default: Any
    option: Option
    flag: str
    group: str | None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def declared(cls: type, path: tuple[str, ...] = (), group: str | None = None) -> list[Declared]:
    """Every option of `cls`, sections flattened, in declaration order."""
    hints = typing.get_type_hints(cls)
    prefix = getattr(cls, "FLAG_PREFIX", "")
    prefix = prefix + "-" if prefix else ""
    out: list[Declared] = []
    for f in dataclasses.fields(cls):
        if SECTION in f.metadata:
            out += declared(hints[f.name], path + (f.name,), f.metadata[SECTION].title)
        elif OPTION in f.metadata:
            opt: Option = f.metadata[OPTION]
            flag = opt.flag or "--" + prefix + f.name.replace("_", "-")
            out.append(Declared(path + (f.name,), f.name, hints[f.name], _default(f), opt, flag, group))
    return out


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(tp))
    return tp, False


def _choices(d: Declared) -> list[Any] | None:
    base, _ = _strip_none(d.type)
    if typing.get_origin(base) is Literal:
        return list(typing.get_args(base))
    return d.option.allowed()


def _describe_type(base: Any) -> str:
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        return f"a comma-separated list of {typing.get_args(base)[0].__name__}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(base, str(base))


# -- validation -------------------------------------------------------------------------------------------
def _bad(d: Declared, what: str, value: Any) -> GraphllmError:
    return GraphllmError(f"{d.flag} must be {what}, got {value!r}")


def _check_value(d: Declared, value: Any) -> Any:
    """`value` checked against the declaration (type, choices, range, extra check); returns it (lists of
    a tuple-typed field become tuples)."""
    base, nullable = _strip_none(d.type)
    if value is None:
        if nullable:
            return None
        raise _bad(d, _describe_type(base), value)
    if d.option.check is not None:  # first: it may give a more specific message than the choices would
        d.option.check(value)
    choices = _choices(d)
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        item = typing.get_args(base)[0]
        if not isinstance(value, (list, tuple)) or not all(_is(item, v) for v in value):
            raise _bad(d, _describe_type(base), value)
        bad = [v for v in value if choices is not None and v not in choices]
        if bad:
            raise GraphllmError(f"{d.flag} takes {', '.join(map(str, choices))}; got {', '.join(map(str, bad))}")
        value = tuple(value) if origin is tuple else list(value)
    elif choices is not None:
        if value not in choices:
            raise GraphllmError(f"{d.flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
    elif not _is(base, value):
        raise _bad(d, _describe_type(base), value)
    o = d.option
    if o.minimum is not None and value < o.minimum:
        raise _bad(d, f"{_describe_type(base)} ≥ {o.minimum:g}", value)
    if o.maximum is not None and value > o.maximum:
        raise _bad(d, f"{_describe_type(base)} ≤ {o.maximum:g}", value)
    return value


def _is(tp: Any, value: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    return isinstance(value, tp) if isinstance(tp, type) else True


def check_fields(obj: Any) -> None:
    """Validate every option field of `obj` (not its sections: each section checks itself)."""
    for d in declared(type(obj)):
        if len(d.path) != 1:
            continue
        value = _check_value(d, getattr(obj, d.name))
        if value is not getattr(obj, d.name):
            object.__setattr__(obj, d.name, value)


# -- command line -----------------------------------------------------------------------------------------
def _dest(d: Declared) -> str:
    return "opt:" + ".".join(d.path)


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = ()) -> None:
    """One flag per command-line option of `cls` (sections as argument groups). Values are parsed as text
    and converted by `from_flags`, so a bad value gets graphllm's one-line error, not argparse's usage."""
    groups: dict[str | None, Any] = {None: parser}
    for d in declared(cls):
        if not d.option.cli or ".".join(d.path) in skip:
            continue
        if d.group not in groups:
            groups[d.group] = parser.add_argument_group(d.group)
        target = groups[d.group]
        base, _ = _strip_none(d.type)
        help_text = d.option.help
        if _shown(d.default):
            shown = ",".join(map(str, d.default)) if isinstance(d.default, (list, tuple)) else d.default
            help_text += f" (default: {shown})"
        if base is bool:
            action = target.add_argument(d.flag, dest=_dest(d), action="store_true", default=None, help=help_text)
        else:
            choices = _choices(d)
            metavar = d.option.metavar or ("{" + ",".join(map(str, choices)) + "}" if choices else
                                           {int: "N", float: "X"}.get(base, d.name.upper()))
            extra = {"action": "append"} if d.option.repeat else {"nargs": d.option.nargs} if d.option.nargs else {}
            action = target.add_argument(d.flag, dest=_dest(d), default=None, metavar=metavar, help=help_text, **extra)
        setattr(action, DECLARED, d)


def _shown(default: Any) -> bool:
    """Whether a default is worth printing (not None / False / empty)."""
    return default is not None and default is not MISSING and default is not False and default not in ([], ())


def _parse(d: Declared, text: str) -> Any:
    base, _ = _strip_none(d.type)
    origin = typing.get_origin(base)
    try:
        if origin in (list, tuple):
            item = typing.get_args(base)[0]
            return [item(x) for x in text.split(",") if x != ""]
        if base in (int, float):
            return base(text)
    except ValueError:
        raise _bad(d, _describe_type(base), text) from None
    if base is str or typing.get_origin(base) is Literal:
        return text
    choices = _choices(d)
    if choices is not None:  # e.g. int choices
        for c in choices:
            if str(c) == text:
                return c
    return text


def flag_values(cls: type, args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    """{path: value} of the flags the user gave (parsed and converted, not yet validated), and for the others
    the values of a --config file (FILE_VALUES)."""
    out: dict[tuple[str, ...], Any] = {}
    from_file = getattr(args, FILE_VALUES, {})
    for d in declared(cls):
        raw = getattr(args, _dest(d), None)
        if raw is None:
            if _dest(d) in from_file:
                out[d.path] = from_file[_dest(d)]
            continue
        if isinstance(raw, list):  # a repeated or multi-word flag: each word parsed, the lists joined
            out[d.path] = [v for text in raw for v in _parse(d, text)]
        else:
            out[d.path] = raw if isinstance(raw, bool) else _parse(d, raw)
    return out


def value_from_file(action: argparse.Action, value: Any, where: str) -> Any:
    """A job file's `value` for `action`'s flag, as the flag expects it typed (a list for a list option, true or
    false for a switch); else GraphllmError naming `where` (file and key), the value and the type. Choices and
    ranges are checked later, as a flag's are."""
    d: Declared | None = getattr(action, DECLARED, None)
    base = _strip_none(d.type)[0] if d is not None else bool if action.nargs == 0 else action.type or str
    if typing.get_origin(base) in (list, tuple):
        item = typing.get_args(base)[0]
        if isinstance(value, list) and all(_is(item, v) for v in value):
            return value
        expected = "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, str(item))
    else:
        base = type(typing.get_args(base)[0]) if typing.get_origin(base) is Literal else base
        kind = base if base in (bool, int, float) or d is not None else str  # other flags: text their type reads
        if _is(kind, value):
            return value if d is not None or kind is not str else base(value)
        expected = _describe_type(kind)
    raise GraphllmError(f"{where} = {value!r}: expected {expected} (as {action.option_strings[0]} takes)")


def from_flags(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `cls` from parsed flags (unset flags keep their defaults); `overrides` set fields."""
    values = flag_values(cls, args)
    return build(cls, values, overrides)


def build(cls: type, values: dict[tuple[str, ...], Any], overrides: dict[str, Any] | None = None) -> Any:
    """`cls(...)` with nested sections built from {path: value}."""
    kwargs: dict[str, Any] = dict(overrides or {})
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            continue
        if SECTION in f.metadata:
            inner = {p[1:]: v for p, v in values.items() if p[0] == f.name}
            if inner:
                kwargs[f.name] = build(hints[f.name], inner)
        elif (f.name,) in values:
            kwargs[f.name] = values[(f.name,)]
    return cls(**kwargs)


# -- JSON -------------------------------------------------------------------------------------------------
def to_dict(obj: Any) -> dict[str, Any]:
    """The config as plain JSON data (sections nested, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        elif isinstance(v, list):
            out[f.name] = [dict(x) if isinstance(x, dict) else x for x in v]
        else:
            out[f.name] = v
    return out


def from_dict(cls: type, data: Any, source: str, path: str = "") -> Any:
    """Rebuild a config from `to_dict`'s form, refusing unknown and wrongly-typed fields with one line
    that names `source` and the field."""
    if not isinstance(data, dict):
        raise GraphllmError(f"{source}: {path or 'the plan'} must be an object, got {type(data).__name__}; "
                            "recompile the artifact")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise GraphllmError(f"{source}: unknown plan field(s) {', '.join(sorted(path + k for k in unknown))}; it was "
                            "written by another graphllm version — recompile")
    kwargs = {}
    for name, value in data.items():
        f = names[name]
        if SECTION in f.metadata:
            kwargs[name] = from_dict(hints[name], value, source, f"{path}{name}.")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except GraphllmError as e:
        raise GraphllmError(f"{source}: {e}; fix the file or recompile the artifact") from None
    except TypeError as e:
        raise GraphllmError(f"{source}: {path}… does not fit {cls.__name__} ({e}); recompile the artifact") from None


# -- documentation ----------------------------------------------------------------------------------------
def _values_text(d: Declared) -> str:
    base, _ = _strip_none(d.type)
    choices = _choices(d)
    if choices:
        return " \\| ".join(map(str, choices))
    if base is bool:
        return "flag"
    if d.option.metavar:
        return f"`{d.option.metavar}`"
    lo, hi = d.option.minimum, d.option.maximum
    if lo is not None and hi is not None:
        return f"{_describe_type(base)} in [{lo:g}, {hi:g}]"
    return _describe_type(base) + (f" ≥ {lo:g}" if lo is not None else "") + (f" ≤ {hi:g}" if hi is not None else "")


def markdown_table(cls: type) -> str:
    """The options of `cls` as a markdown table: flag, values, default, meaning."""
    lines = ["| flag | values | default | meaning |", "|---|---|---|---|"]
    group = None
    for d in declared(cls):
        if not d.option.cli:
            continue
        if d.group != group and d.group is not None:
            lines.append(f"| **{d.group}** | | | |")
        group = d.group
        values = _values_text(d)
        default = "" if not _shown(d.default) else (
            ",".join(map(str, d.default)) if isinstance(d.default, (list, tuple)) else str(d.default))
        lines.append(f"| `{d.flag}` | {values} | {default} | {d.option.help} |")
    return "\n".join(lines) + "\n"
