"""The pass registry: ``@register_pass`` with a typed options schema.

A pass is a function ``fn(graph, ctx, *, opt=option(default, "doc"), ...)`` that rewrites the
graph in place (or returns a new one). Options are keyword-only parameters; their annotations
give the type, so ``"token_merge:r=8"`` strings and ``("token_merge", {"r": 8})`` objects are both
checked and converted the same way. In the string form a list is ``a,b`` or ``[a,b]`` and a mapping
``{key:value,key2:value2}`` (quotes optional; the last ``:`` splits a key from its value, so
``{re:blocks\\.[0-3]\\..*:16}`` works). Pass authors register from their own package; a name can only be
taken once, so plugins cannot silently replace each other.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from graphopt.ir import Graph
from graphopt.ir.registry import Registry, did_you_mean

_NO_DEFAULT = object()


@dataclass(frozen=True)
class Option:
    default: Any = _NO_DEFAULT
    doc: str = ""


def option(default: Any = _NO_DEFAULT, doc: str = "") -> Any:
    """Declare a pass option: ``r: int = option(8, "tokens merged per block")``."""
    return Option(default, doc)


class PassConfigError(ValueError):
    """A pass name or option that does not exist or does not parse."""


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: Any
    default: Any
    doc: str

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    def type_name(self) -> str:
        if typing.get_origin(self.type) is Literal:
            return "|".join(map(str, typing.get_args(self.type)))
        return getattr(self.type, "__name__", str(self.type)).replace("typing.", "")

    def convert(self, value: Any, pass_name: str) -> Any:
        def fail(why: str):
            raise PassConfigError(f"pass {pass_name!r}: option {self.name}={value!r}: {why} (expected {self.type_name()})")

        origin, args = typing.get_origin(self.type), typing.get_args(self.type)
        if origin is Literal:
            if value not in args:
                fail(f"must be one of {list(args)}")
            return value
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            if value is None and type(None) in args:
                return None
            for t in (a for a in args if a is not type(None)):
                try:
                    return OptionSpec(self.name, t, self.default, self.doc).convert(value, pass_name)
                except PassConfigError:
                    continue
            fail("does not fit any of the allowed types")
        if origin in (list, tuple) or self.type in (list, tuple):
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("[") != text.endswith("]"):
                    fail("has an unclosed '['; write [a,b] or a,b")
                text = text[1:-1] if text.startswith("[") else text
                items = [v.strip() for v in text.split(",")] if text else []
            else:
                items = value
            if not isinstance(items, (list, tuple)):
                fail("must be a list")
            inner = OptionSpec(self.name, args[0] if args else str, self.default, self.doc)
            return [inner.convert(v, pass_name) for v in items]
        if origin is dict or self.type is dict:
            if isinstance(value, str):
                value = _parse_mapping(value, fail)
            if not isinstance(value, dict):
                fail("must be a mapping, written {key:value,key2:value2}")
            return dict(value)
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            fail("must be true or false")
        if self.type in (int, float):
            if isinstance(value, bool):
                fail("must be a number")
            try:
                number = self.type(value) if isinstance(value, str) else value
            except ValueError:
                fail("is not a number")
            if self.type is int and (not isinstance(number, int) or isinstance(value, float)):
                fail("must be an integer")
            return float(number) if self.type is float else number
        if self.type is str:
            if not isinstance(value, str):
                fail("must be a string")
            return value
        return value


@dataclass
class PassInfo:
    name: str
    fn: Callable
    options: dict[str, OptionSpec]
    description: str
    tolerance: float | None
    requires: Callable[[Graph], str | None] | None = None
    ensures: Callable[[Graph], str | None] | None = None
    module: str = ""

    def help(self) -> str:
        lines = [f"{self.name}: {self.description.splitlines()[0] if self.description else ''}"]
        if self.description and len(self.description.splitlines()) > 1:
            lines += ["  " + l for l in self.description.splitlines()[1:]]
        if self.options:
            lines.append("options:")
            for o in self.options.values():
                default = "required" if o.required else f"default {o.default!r}"
                lines.append(f"  {o.name} ({o.type_name()}, {default}): {o.doc}")
        tol = "reported only" if self.tolerance is None else f"max abs error <= {self.tolerance:g}"
        lines.append(f"numerical check: {tol}")
        return "\n".join(lines)


@dataclass
class PassSpec:
    """A pass with validated options, ready to run."""
    info: PassInfo
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items() if v != self.info.options[k].default)
        return f"{self.name}:{opts}" if opts else self.name


def _load_builtin_passes() -> None:
    import graphopt.passes.builtin  # noqa: F401  (registers the built-in passes)


PASSES: Registry[PassInfo] = Registry("pass", group="graphopt.passes", error=PassConfigError,
                                      builtins=_load_builtin_passes)


def register_pass(name: str, *, tolerance: float | None = 1e-5, requires=None, ensures=None, replace: bool = False):
    """Register ``fn`` as pass ``name``. ``tolerance`` is the max abs error the pass may introduce
    when the manager checks it numerically (None: the pass is lossy and its error is only reported).
    ``requires``/``ensures`` take the graph and return None or the reason the condition fails."""
    def wrap(fn):
        hints = typing.get_type_hints(fn)
        options = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            spec = p.default if isinstance(p.default, Option) else Option(p.default if p.default is not p.empty else _NO_DEFAULT)
            options[p.name] = OptionSpec(p.name, hints.get(p.name, str), spec.default, spec.doc)
        PASSES.register(name, PassInfo(name, fn, options, inspect.cleandoc(fn.__doc__ or ""), tolerance,
                                       requires, ensures, fn.__module__), replace=replace, owner=fn.__module__)
        return fn
    return wrap


def get_pass(name: str, listing: str = "graphopt.list_passes()") -> PassInfo:
    """``listing``: what the error tells the user to run to see every pass (the CLI names its flag)."""
    info = PASSES.find(name)
    if info is None:
        several = "; a pass name has no ',': give several passes as a list" if "," in name else ""
        raise PassConfigError(f"unknown pass {name!r}{did_you_mean(name, PASSES.names())}{several}; "
                              f"{listing} shows them all")
    return info


def list_passes() -> list[str]:
    return PASSES.names()


def pass_help(name: str) -> str:
    return get_pass(name).help()


def make_spec(item, listing: str = "graphopt.list_passes()") -> PassSpec:
    """Accepts ``"name"``, ``"name:k=v,k2=v2"``, ``("name", {"k": v})`` or a PassSpec."""
    if isinstance(item, PassSpec):
        return item
    if isinstance(item, str):
        name, _, rest = item.partition(":")
        raw = {}
        for part in filter(None, _split_options(rest)):
            key, eq, value = part.partition("=")
            if not eq:
                raise PassConfigError(f"pass {name!r}: option {part!r} has no '=' (write {part}=VALUE)")
            raw[key.strip()] = value.strip()
    elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict):
        name, raw = item
    else:
        raise PassConfigError(f"cannot read a pass from {item!r}; use 'name', 'name:k=v' or ('name', {{k: v}})")
    info = get_pass(name.strip(), listing)
    options = {}
    for key, value in raw.items():
        if key not in info.options:
            raise PassConfigError(f"pass {info.name!r} has no option {key!r}{did_you_mean(key, info.options)}; "
                                  f"it takes {sorted(info.options) or 'no options'}")
        options[key] = info.options[key].convert(value, info.name)
    for key, spec in info.options.items():
        if key not in options:
            if spec.required:
                raise PassConfigError(f"pass {info.name!r} needs option {key!r} ({spec.doc})")
            options[key] = spec.default
    return PassSpec(info, options)


def _split_options(text: str) -> list[str]:
    """Split on commas that start a new ``key=``; commas inside a list or ``{...}``/``[...]`` value stay."""
    parts: list[str] = []
    depth = 0
    for piece in text.split(","):
        if parts and (depth > 0 or "=" not in piece):
            parts[-1] += "," + piece
        else:
            parts.append(piece)
        depth += piece.count("{") + piece.count("[") - piece.count("}") - piece.count("]")
    return parts


def _parse_mapping(text: str, fail) -> dict:
    """``{key:value,...}`` as written on a command line: quotes optional, numbers become numbers."""
    import ast

    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        fail("must be a mapping, written {key:value,key2:value2}")
    try:
        value = ast.literal_eval(text)
        if isinstance(value, dict):
            return value
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # not Python: read it as key:value
        pass
    mapping = {}
    for item in filter(str.strip, text[1:-1].split(",")):
        key, colon, raw = item.rpartition(":")
        if not colon or not key.strip():
            fail(f"entry {item.strip()!r} is not key:value")
        mapping[key.strip().strip("'\"")] = _scalar(raw.strip().strip("'\""))
    return mapping


def _scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def register_rule_set(rule_set, *, name: str | None = None, tolerance: float | None = 1e-5):
    """Expose a RuleSet as a pass; the report counts how often each rule fired."""
    def run(graph: Graph, ctx) -> None:
        for rule, fired in rule_set.apply(graph).items():
            ctx.count(rule, fired)

    run.__doc__ = f"Rule set {rule_set.name}: " + "; ".join(f"{r.name}: {r.doc}" for r in rule_set.rules)
    run.__module__ = getattr(rule_set, "__module__", __name__)
    return register_pass(name or rule_set.name, tolerance=tolerance)(run)
