"""Typed options: what a method declares it takes (:class:`Option`), and the one value check against a type hint
(:func:`check_value`) that method options and model options are validated with at the boundary (the CLI and config,
:func:`pwsconv.models.build_model`, :func:`pwsconv.convert`)."""

from __future__ import annotations

import collections.abc
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping

__all__ = ["Option", "check_value", "check_kwargs", "describe", "OptionValueError"]


class OptionValueError(ValueError):
    """A value of the wrong type or out of range; the message is one line and names the option."""


def _args(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _seq_item(hint: Any) -> tuple[bool, Any]:
    """(is a sequence type, its item type) for ``Sequence[int]``, ``list[int]``, ``tuple[int, ...]``, ``tuple``."""
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple, collections.abc.Sequence, typing.Sequence):
        args = [a for a in _args(hint) if a is not Ellipsis]
        return True, (args[0] if len(set(args)) == 1 else Any)
    return False, None


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is a value of type ``hint`` as a config holds it: bool is not a number, an int is a float, a
    whole float is an int (YAML's ``8.0``), floats are finite, a list or tuple is a sequence."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    if _is_union(hint):
        return any(matches(value, h) for h in _args(hint))
    if typing.get_origin(hint) is Literal:
        return any(value == a and type(value) is type(a) for a in _args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return not isinstance(value, bool) and (isinstance(value, int)
                                                or isinstance(value, float) and value.is_integer())
    if hint is float:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    is_seq, item = _seq_item(hint)
    if is_seq:
        return isinstance(value, (list, tuple)) and all(matches(v, item) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True   # a hint this check does not read (a TypeVar, a Protocol, ...): left to the callee


def describe(hint: Any) -> str:
    """The values of ``hint`` in words: ``"a finite number or 'auto'"``."""
    if hint is Any or hint is object:
        return "anything"
    if hint is None or hint is type(None):
        return "null"
    if _is_union(hint):
        parts = [h for h in _args(hint) if h is not type(None)]
        words = " or ".join(describe(h) for h in parts)
        return words + (" or null" if len(parts) < len(_args(hint)) else "")
    if typing.get_origin(hint) is Literal:
        values = ", ".join(repr(a) for a in _args(hint))
        return values if len(_args(hint)) == 1 else "one of " + values
    words = {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}
    if hint in words:
        return words[hint]
    is_seq, item = _seq_item(hint)
    if is_seq:
        return "a list" + ("" if item is Any else f" of {describe(item).removeprefix('a ').removeprefix('an ')}s")
    return getattr(hint, "__name__", str(hint))


def check_value(where: str, value: Any, hint: Any) -> None:
    """Raise :class:`OptionValueError` ``"{where} must be {describe(hint)}, got {value!r}"`` unless ``value`` is a
    value of ``hint``."""
    if not matches(value, hint):
        raise OptionValueError(f"{where} must be {describe(hint)}, got {value!r}")


def parameter_hints(fn: Any) -> dict[str, Any]:
    """{parameter: type hint} of a callable's (a class: its constructor's) keyword-capable parameters: the default's
    type where a parameter has no annotation, ``Any`` where its annotation cannot be resolved (``fn`` checks those)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    try:
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:   # an annotation naming something not importable here
        hints = {}
    out: dict[str, Any] = {}
    for n, p in params.items():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            d = p.default
            out[n] = hints.get(n, type(d) if isinstance(d, (bool, int, float, str)) else Any)
    return out


def check_kwargs(where: str, kwargs: Mapping[str, Any], fn: Any) -> None:
    """:func:`check_value` of each keyword argument for ``fn`` against its parameter's type hint (``where.name``)."""
    hints = parameter_hints(fn)
    for k, v in kwargs.items():
        check_value(f"{where}.{k}", v, hints.get(k, Any))


@dataclass(frozen=True)
class Option:
    """One option a method takes: its name, its type (a type hint: ``bool``, ``int``, ``float | Literal["auto"]``,
    ``float | None``, ...) and, for numbers, its range. A method lists its options in ``Method.conv_options`` or
    ``Method.norm_options``: the factory each one goes to.

    ``low``/``high``: bounds of a numeric value (``low_open``: > low instead of ≥ low). ``doc``: one line for the
    docs. :meth:`check` is the one validation of the option, run wherever the method's options enter.
    """

    name: str
    type: Any = Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    doc: str = ""

    def describe(self) -> str:
        words = describe(self.type)
        if self.low is not None or self.high is not None:
            if self.low is not None and self.high is not None:
                rng = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
            elif self.low is not None:
                rng = f"{'>' if self.low_open else '≥'} {self.low:g}"
            else:
                rng = f"≤ {self.high:g}"
            number = next((w for w in ("a finite number", "an integer") if w in words), None)
            if number:
                words = words.replace(number, f"{number} {rng}", 1)
        return words

    def check(self, value: Any, where: str | None = None) -> Any:
        """``value`` (a whole float as an int where the option is an integer, as YAML may write ``8.0``); raise
        :class:`OptionValueError` unless it is of the option's type and in its range."""
        if isinstance(value, float) and value.is_integer() and not _accepts(self.type, float) \
                and _accepts(self.type, int):
            value = int(value)
        ok = matches(value, self.type)
        if ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.low is not None and (value <= self.low if self.low_open else value < self.low):
                ok = False
            if self.high is not None and value > self.high:
                ok = False
        if not ok:
            raise OptionValueError(f"{where or self.name} must be {self.describe()}, got {value!r}")
        return value


def _accepts(hint: Any, t: type) -> bool:
    return hint is t or (_is_union(hint) and t in _args(hint))
