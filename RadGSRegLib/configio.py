"""Settings dataclasses from JSON (or Python): every field checked against its annotation,
unknown fields refused by name, every error naming the source (a file) and the field path
(``model.backbone``, ``refine2d.levels[1].pixels``).

Torch-free and Python-3.9-safe (the Slicer module reads its settings through this before
any heavy dependency is installed).

Annotations are read as strings (the modules using this have ``from __future__ import
annotations``). Understood: ``bool``, ``int``, ``float``, ``str``, ``Optional[X]`` and
``X | None``, ``tuple`` (a list of numbers; of integers when the field's default holds
integers), ``tuple[X, Y]`` (exactly that many), ``tuple[X, ...]``, ``list`` (any JSON
list), ``list[X]``, ``dict``, and the name of another dataclass of the same module (a
nested JSON object). Python callers may also give tuples for lists, ``os.PathLike`` for
strings and NumPy numbers for numbers; values are normalised (tuples for tuples, floats for
floats, ``str`` for paths).

Use: ``build(cls, data, source=...)`` for a JSON object, ``check(self)`` at the start of a
dataclass's ``__post_init__`` for objects made in Python. A ``__post_init__`` that finds a
problem raises ``ConfigError(problem, field=name)``; :func:`build` adds the source and the
path of the enclosing fields.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import sys
from pathlib import Path

from .errors import InputError

__all__ = ["ConfigError", "build", "check", "at_least", "read_json"]


class ConfigError(InputError):
    """A setting that cannot be used. ``source`` (a file, or None), ``field`` (its path, or
    None for a problem of several fields) and ``problem`` say where and what."""

    def __init__(self, problem: str, *, field: str | None = None, source: str | None = None):
        self.problem, self.field, self.source = problem, field, source
        text = f"{field} {problem}" if field else problem
        super().__init__(f"{source}: {text}" if source else text)


def read_json(path, *, error=ConfigError) -> dict:
    """The JSON object in ``path`` (errors name the file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error("file not found", source=str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise error(f"cannot be read ({type(e).__name__})", source=str(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"not valid JSON (line {e.lineno}: {e.msg})", source=str(path)) from None
    if not isinstance(data, dict):
        raise error("must hold a JSON object ({...}) at the top level", source=str(path))
    return data


def build(cls, data, *, source: str | None = None, prefix: str = "", error=ConfigError,
          unknown: str = "unknown field"):
    """An instance of the dataclass ``cls`` from a JSON object ``data``; fields left out keep
    their defaults.

    Args:
        source: how to name where ``data`` came from (a file), or None.
        prefix: the path of ``cls`` inside the enclosing object ("model.").
        error: the exception class (a :class:`ConfigError` or one with its signature).
        unknown: the words before an unknown field's name.
    """
    where = prefix.rstrip(".")
    if not isinstance(data, dict):
        raise error(f"must be a JSON object, not {_show(data)}", field=where or None, source=source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = [k for k in data if k not in fields]
    if extra:
        raise error(f"{unknown} '{prefix}{extra[0]}'; known fields: {', '.join(fields)}", source=source)
    module = sys.modules[cls.__module__].__dict__
    kwargs = {name: _convert(value, fields[name].type, prefix + name, _Ctx(source, error, module, unknown),
                             _default(fields[name])) for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]                    # type: ignore[misc]
    if missing:
        raise error(f"needs {', '.join(missing)}", field=where or None, source=source)
    try:
        return cls(**kwargs)
    except error as e:
        if getattr(e, "source", None) is not None:
            raise
        problem, fld = getattr(e, "problem", str(e)), getattr(e, "field", None)
        raise error(problem, field=(prefix + fld) if fld else (where or None), source=source) from None


def check(obj, *, error=ConfigError) -> None:
    """Check and normalise every field of a dataclass instance in place (call it first in
    ``__post_init__``); a nested dataclass field may be given as a dict."""
    module = sys.modules[type(obj).__module__].__dict__
    ctx = _Ctx(None, error, module)
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _convert(getattr(obj, f.name), f.type, f.name, ctx, _default(f)))


def at_least(obj, names, low, what: str, *, error=ConfigError) -> None:
    """Refuse any of the fields ``names`` of ``obj`` below ``low`` (``what`` says what a
    field must be, e.g. "a positive integer"); the error names the field."""
    for name in names:
        v = getattr(obj, name)
        if v < low:
            raise error(f"must be {what}, not {v}", field=name)


# ------------------------------------------------------------------ internals
class _Ctx:
    def __init__(self, source, error, module, unknown="unknown field"):
        self.source, self.error, self.module, self.unknown = source, error, module, unknown

    def fail(self, where: str, problem: str):
        return self.error(problem, field=where, source=self.source)


def _default(f):
    """The field's plain default (what a bare ``tuple`` annotation's element type is read from)."""
    return f.default


def _show(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _optional(ann: str) -> tuple[bool, str]:
    ann = ann.strip()
    if ann.startswith("Optional[") and ann.endswith("]"):
        return True, ann[len("Optional["):-1].strip()
    parts = _split(ann, "|")
    if len(parts) > 1 and "None" in parts:
        rest = [p for p in parts if p != "None"]
        return True, " | ".join(rest)
    return False, ann


def _split(text: str, sep: str) -> list:
    """``text`` split at ``sep`` outside brackets, parts stripped."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def _scalar(value, kind: str, where: str, ctx: _Ctx):
    if kind == "bool":
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return bool(value)
    elif kind == "int":
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_":
            return int(value)
    elif kind == "float":
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_":
            if not math.isfinite(float(value)):
                raise ctx.fail(where, f"must be a finite number, not {value}")
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    raise ctx.fail(where, f"must be {_WORDS[kind]}, not {_show(value)}")


def _convert(value, ann, where: str, ctx: _Ctx, default=dataclasses.MISSING):
    ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    optional, ann = _optional(ann)
    if value is None:
        if optional:
            return None
        raise ctx.fail(where, "must not be null")
    if ann in _WORDS:
        return _scalar(value, ann, where, ctx)
    head, _, rest = ann.partition("[")
    head = head.strip()
    args = _split(rest[:-1], ",") if rest else None
    if head in ("tuple", "list", "Tuple", "List"):
        if not isinstance(value, (list, tuple)):
            raise ctx.fail(where, f"must be a list, not {_show(value)}")
        if args is None:
            if head.lower() == "list":
                return list(value)
            # a bare tuple: numbers; integers when the default holds integers (e.g. iteration counts)
            integers = isinstance(default, tuple) and bool(default) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in default)
            kinds = ["int" if integers else "float"] * len(value)
        elif len(args) == 2 and args[1] == "...":
            kinds = [args[0]] * len(value)
        elif head.lower() == "tuple":
            if len(value) != len(args):
                raise ctx.fail(where, f"must be a list of {len(args)} values, not {_show(value)}")
            kinds = args
        else:
            kinds = [args[0]] * len(value)
        out = [_convert(v, k, f"{where}[{i}]", ctx) for i, (v, k) in enumerate(zip(value, kinds))]
        return tuple(out) if head.lower() == "tuple" else out
    if head in ("dict", "Dict"):
        if not isinstance(value, dict):
            raise ctx.fail(where, f"must be a JSON object, not {_show(value)}")
        return dict(value)
    nested = ctx.module.get(ann)
    if isinstance(nested, type) and dataclasses.is_dataclass(nested):
        if isinstance(value, nested):
            return value
        if isinstance(value, dict):
            return build(nested, value, source=ctx.source, prefix=where + ".", error=ctx.error, unknown=ctx.unknown)
        raise ctx.fail(where, f"must be a JSON object, not {_show(value)}")
    raise AssertionError(f"config field {where} has an annotation the reader does not know: {ann}")
