"""The config schema: what each key allows, declared beside its type, checked when a config loads.

A config field says what it allows in its annotation, next to its type and its one-line ``# doc``::

    steps: PositiveInt = 1000  # optimisation steps
    ema_decay: Annotated[float, Interval(ge=0, lt=1)] = 0.0  # EMA of the student (0 disables)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp16 uses a gradient scaler
    small: Annotated[dict, Keys(unet_keys, "...")] = ...  # keys checked against what the builder accepts

Bounds use the ``annotated_types`` vocabulary (``Ge``, ``Gt``, ``Le``, ``Lt``, ``Interval``, ``Len``), the
same markers pydantic reads; ``Literal`` lists fixed words, :class:`OneOf` words known only at run time
(diffusers' schedule names), :class:`Keys` the keys a free-form mapping may hold. :func:`check_value`
checks a value against such an annotation and raises one :class:`~diffdistill.errors.UserError` line
naming the key, the value and what is allowed (with a "did you mean" for words); :func:`schema_rows`
and :func:`format_table` turn the same annotations and docs into ``diffdistill config show``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Annotated, Any, Callable, Iterable, Literal, Optional, Union

from annotated_types import Ge, Gt, Interval, Le, Len, Lt, MaxLen, MinLen

from .errors import UserError

# The common shapes of an allowed range, named.
PositiveInt = Annotated[int, Ge(1)]  # a count of at least one (steps, batch size, every-N cadences)
Count = Annotated[int, Ge(0)]  # a count that may be zero (often: 0 disables)
PositiveFloat = Annotated[float, Gt(0)]  # a scale, a rate, a noise level
NonNegFloat = Annotated[float, Ge(0)]  # a loss weight, a guidance scale, a clip norm
Probability = Annotated[float, Interval(ge=0, le=1)]
Fraction = Annotated[float, Interval(gt=0, le=1)]  # a share that cannot be zero


class OneOf:
    """Allowed words computed when first needed (``names()``), e.g. the schedules diffusers accepts."""

    def __init__(self, names: Callable[[], Iterable[str]], what: str = "") -> None:
        self._names = names
        self._cache: Optional[tuple[str, ...]] = None
        self.what = what

    @property
    def names(self) -> tuple[str, ...]:
        if self._cache is None:
            self._cache = tuple(self._names())
        return self._cache


class Keys:
    """The keys a free-form mapping may hold (``names()``, computed when the mapping is not empty)."""

    def __init__(self, names: Callable[[], Iterable[str]], what: str) -> None:
        self._names = names
        self._cache: Optional[tuple[str, ...]] = None
        self.what = what

    @property
    def names(self) -> tuple[str, ...]:
        if self._cache is None:
            self._cache = tuple(sorted(self._names()))
        return self._cache


class TypeMismatch(UserError):
    """The value is not of the key's type at all (as opposed to outside its allowed values)."""


_NONE = type(None)
_BOUNDS = (Ge, Gt, Le, Lt, Interval)
_LENGTHS = (Len, MinLen, MaxLen)


def _unwrap(tp: Any) -> tuple[Any, list]:
    """``Annotated[T, m1, m2]`` -> ``(T, [m1, m2])`` (nested ``Annotated`` flattened)."""
    marks: list = []
    while typing.get_origin(tp) is Annotated:
        args = typing.get_args(tp)
        tp, marks = args[0], list(args[1:]) + marks
    return tp, marks


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def type_name(tp: Any) -> str:
    """How a key's type reads in messages and in ``config show`` (YAML words: ``null``, not ``None``)."""
    tp, _ = _unwrap(tp)
    origin = typing.get_origin(tp)
    if tp is _NONE:
        return "null"
    if _is_union(tp):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        kinds = {type(a) for a in typing.get_args(tp)}
        return kinds.pop().__name__ if len(kinds) == 1 else "str"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "dict"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds(marks: list) -> tuple[Any, bool, Any, bool]:
    lo, lo_in, hi, hi_in = None, True, None, True
    for m in marks:
        if not isinstance(m, _BOUNDS):
            continue
        for attr, value in (("ge", True), ("gt", False)):
            v = getattr(m, attr, None)
            if v is not None and (lo is None or v > lo or (v == lo and not value)):
                lo, lo_in = v, value
        for attr, value in (("le", True), ("lt", False)):
            v = getattr(m, attr, None)
            if v is not None and (hi is None or v < hi or (v == hi and not value)):
                hi, hi_in = v, value
    return lo, lo_in, hi, hi_in


def _range_text(marks: list) -> str:
    lo, lo_in, hi, hi_in = _bounds(marks)
    if lo is not None and hi is not None:
        return f"in {'[' if lo_in else '('}{_num(lo)}, {_num(hi)}{']' if hi_in else ')'}"
    if lo is not None:
        return f"{'>=' if lo_in else '>'} {_num(lo)}"
    if hi is not None:
        return f"{'<=' if hi_in else '<'} {_num(hi)}"
    return ""


def _length_limits(marks: list) -> tuple[Optional[int], Optional[int]]:
    lo, hi = None, None
    for m in marks:
        if isinstance(m, (Len, MinLen)):
            lo = m.min_length
        if isinstance(m, Len):
            hi = m.max_length
        elif isinstance(m, MaxLen):
            hi = m.max_length
    return lo, hi


def _length_text(marks: list) -> str:
    lo, hi = _length_limits(marks)
    if lo is not None and lo == hi:
        return f"{lo} entries"
    if lo is not None and hi is not None:
        return f"{lo} to {hi} entries"
    if lo is not None:
        return f"at least {lo} entr{'y' if lo == 1 else 'ies'}"
    if hi is not None:
        return f"at most {hi} entries"
    return ""


def allowed_text(tp: Any) -> str:
    """What a key allows, in words (``>= 1``, ``in [0, 1)``, ``no | bf16 | fp16``); ``""`` for anything."""
    tp, marks = _unwrap(tp)
    parts = []
    if _is_union(tp):
        inner = [allowed_text(a) for a in typing.get_args(tp) if a is not _NONE]
        parts += [t for t in inner if t]
    elif typing.get_origin(tp) is Literal:
        parts.append(" | ".join(str(a) for a in typing.get_args(tp)))
    elif typing.get_origin(tp) in (list, tuple):
        args = typing.get_args(tp)
        item = allowed_text(args[0]) if args else ""
        if item:
            parts.append(f"each {item}")
    for m in marks:
        if isinstance(m, OneOf):
            try:
                parts.append(" | ".join(m.names))
            except Exception:  # noqa: BLE001 - an uninstalled optional library: say where the list lives
                parts.append(m.what)
        elif isinstance(m, Keys):
            parts.append(f"keys: {m.what}")
    for text in (_range_text(marks), _length_text(marks)):
        if text:
            parts.append(text)
    return "; ".join(parts)


def _suggest(word: Any, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """``value`` against the bare type ``tp`` (no markers), gently coerced (int -> float, YAML words)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and _NONE in args:
            return None
        outside: Optional[UserError] = None
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return check_value(value, arg, key)
            except TypeMismatch:
                continue
            except UserError as e:  # the right type, outside what it allows: that is the message
                outside = outside or e
        if outside is not None:
            raise outside
        raise TypeMismatch(f"config key '{key}' expects {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
            # YAML 1.1 reads an unquoted no / yes as a boolean: `mixed_precision: no` means the word
            value = {False: "no", True: "yes"}[value]
        for c in choices:
            if value == c and type(value) is type(c):
                return c
        if not any(isinstance(value, type(c)) and not isinstance(value, bool) for c in choices):
            raise TypeMismatch(f"config key '{key}' expects {type_name(tp)}, got {value!r}")
        words = ", ".join(str(c) for c in choices)
        raise UserError(f"config key '{key}' must be one of {words}, got {value!r}{_suggest(value, choices)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string: accept it as a number
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeMismatch(f"config key '{key}' expects float, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeMismatch(f"config key '{key}' expects int, got {value!r}")
    if tp is bool:
        words = {"yes": True, "on": True, "no": False, "off": False}  # the YAML 1.1 words kept as text by --set
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
        if isinstance(value, bool):
            return value
        raise TypeMismatch(f"config key '{key}' expects bool, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeMismatch(f"config key '{key}' expects str, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeMismatch(f"config key '{key}' expects {type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(check_value(v, args[0], f"{key}[{i}]") if args else v)
            except TypeMismatch:
                raise TypeMismatch(f"config key '{key}' expects {type_name(tp)}, got {value!r}") from None
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise TypeMismatch(f"config key '{key}' expects a mapping, got {value!r}")
    return value


def check_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (type, then what its markers allow); returns the value
    as the config keeps it. Raises one :class:`UserError` line naming ``key``, the value and the rule."""
    bare, marks = _unwrap(tp)
    value = _check_type(value, bare, key)
    if value is None:
        return value
    for m in marks:
        if isinstance(m, OneOf) and value not in m.names:
            raise UserError(f"config key '{key}' must be one of {', '.join(m.names)}, got {value!r}"
                            f"{_suggest(value, m.names)}")
        if isinstance(m, Keys) and isinstance(value, dict) and value:
            for k in value:
                if k not in m.names:
                    close = difflib.get_close_matches(str(k), m.names, n=1)
                    hint = f"; did you mean '{key}.{close[0]}'?" if close else f" ({key} takes {m.what})"
                    raise UserError(f"unknown config key '{key}.{k}'{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, lo_in, hi, hi_in = _bounds(marks)
        if ((lo is not None and (value < lo or (value == lo and not lo_in)))
                or (hi is not None and (value > hi or (value == hi and not hi_in)))):
            raise UserError(f"config key '{key}' must be {_range_text(marks)}, got {value!r}")
    if isinstance(value, (list, tuple)):
        lo, hi = _length_limits(marks)
        if (lo is not None and len(value) < lo) or (hi is not None and len(value) > hi):
            raise UserError(f"config key '{key}' must have {_length_text(marks)}, got {list(value)!r}")
    return value


# ------------------------------------------------------------------------------------------------
# Docs and `diffdistill config show`


def field_docs(cls: type) -> dict[str, str]:
    """Each field's one-line doc: the ``# comment`` beside it, else the comment lines just above it
    (read from the source of ``cls`` and its dataclass bases; empty when no source is shipped)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        docs.update(_docs_from_source(source, set(getattr(klass, "__annotations__", {}))))
    return docs


def _docs_from_source(source: str, names: set[str]) -> dict[str, str]:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    above: list[str] = []  # full-line comments just above the current statement
    depth, line_start, current, beside, shared = 0, True, None, [], ""
    for i, tok in enumerate(tokens):
        kind = tok.type
        if kind == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if current is not None:
                beside.append(text)
            elif line_start:
                above.append(text)
            continue
        if kind == tokenize.INDENT:
            depth += 1
        elif kind == tokenize.DEDENT:
            depth -= 1
        elif kind == tokenize.NEWLINE:
            if current is not None:
                if beside:
                    docs[current], shared = " ".join(beside), ""
                else:  # a comment block above a run of fields without their own comment documents them all
                    shared = " ".join(above) or shared
                    docs[current] = shared
            else:
                shared = ""
            current, beside, above = None, [], []
        elif kind == tokenize.NL:
            if line_start and current is None and tokens[i - 1].type != tokenize.COMMENT:
                above, shared = [], ""  # a blank line ends a comment block
        elif kind == tokenize.NAME and line_start and depth == 1 and tok.string in names:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is not None and nxt.type == tokenize.OP and nxt.string == ":":
                current = tok.string
        line_start = kind in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
        if kind not in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT) and current is None:
            above = [] if kind != tokenize.STRING else above
    return docs


def _show_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, dict):
        return "{}" if not value else "{" + ", ".join(f"{k}: {_show_default(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show_default(v) for v in value) + "]"
    return repr(value)


def schema_rows(cls: type, prefix: str = "", skip: Iterable[str] = ()) -> list[tuple[str, str, str, str, str]]:
    """``(key, type, default, allowed, doc)`` for every key of dataclass ``cls`` (nested sections flattened)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    defaults = cls()
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += schema_rows(tp, key + ".")
            continue
        rows.append((key, type_name(tp), _show_default(getattr(defaults, f.name)), allowed_text(tp),
                     docs.get(f.name, "")))
    return rows


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = ("key", "type", "default", "allowed", "doc"),
                 max_width: tuple[int, ...] = (34, 16, 24, 34)) -> str:
    """Rows as aligned text columns (the last column is never padded or cut; long cells wrap onto the
    next line's column)."""
    widths = [min(max(len(r[i]) for r in [header, *rows]), max_width[i]) for i in range(len(header) - 1)]
    out = []
    for r in [header, *rows]:
        cells = [textwrap.wrap(c, w) or [""] for c, w in zip(r[:-1], widths)]
        height = max(len(c) for c in cells)
        for j in range(height):
            parts = [(c[j] if j < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
            last = r[-1] if j == 0 else ""
            out.append("  ".join(parts + [last]).rstrip())
    return "\n".join(out)


__all__ = ["PositiveInt", "Count", "PositiveFloat", "NonNegFloat", "Probability", "Fraction", "OneOf", "Keys",
           "Ge", "Gt", "Le", "Lt", "Interval", "Len", "MinLen", "MaxLen", "Annotated", "Literal", "check_value",
           "allowed_text", "type_name", "field_docs", "schema_rows", "format_table", "TypeMismatch"]
