"""The op registry: every IR op declares its inputs, typed attributes, a type rule that
works on symbolic shapes, and a reference implementation in torch.

Pass authors add ops from their own package with the same decorator the built-ins use::

    @register_op("mypkg.swish", inputs=["x"], attrs={"beta": Attr("float", 1.0)}, infer=same_as_input)
    def swish(x, *, beta):
        return x * torch.sigmoid(beta * x)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import sympy
import torch

from graphopt.ir.registry import Registry
from graphopt.ir.types import TensorType

REQUIRED = object()

_ATTR_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
    "floats": lambda v: isinstance(v, tuple) and all(isinstance(i, (int, float)) for i in v),
    "shape": lambda v: isinstance(v, tuple) and all(isinstance(i, (int, sympy.Expr)) and not isinstance(i, bool) for i in v),
    "dim": lambda v: isinstance(v, (int, sympy.Expr)) and not isinstance(v, bool),
    "scalar": lambda v: isinstance(v, (int, float, bool)),
    "dtype": lambda v: isinstance(v, torch.dtype),
    "types": lambda v: isinstance(v, tuple) and all(isinstance(t, TensorType) for t in v),
    "any": lambda v: True,
}


@dataclass(frozen=True)
class Attr:
    """A typed attribute: kind is one of int, float, bool, str, ints, floats, shape, dim,
    scalar, dtype, types, any. Attributes whose default is REQUIRED must be given."""
    kind: str
    default: Any = REQUIRED
    doc: str = ""

    def __post_init__(self):
        if self.kind not in _ATTR_CHECKS:
            raise ValueError(f"unknown attribute kind {self.kind!r}; use one of {sorted(_ATTR_CHECKS)}")

    def accepts(self, value) -> bool:
        return (value is None and self.default is None) or _ATTR_CHECKS[self.kind](value)


class OpError(Exception):
    """An op was used with inputs or attributes its schema rejects."""


@dataclass
class OpSchema:
    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Attr]
    infer: Callable[..., Any]
    reference: Callable[..., Any]
    doc: str = ""
    pure: bool = True
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].startswith("*")

    @property
    def required_inputs(self) -> int:
        return sum(1 for name in self.inputs if not name.endswith("?") and not name.startswith("*"))

    def check_arity(self, count: int) -> str | None:
        if self.variadic:
            return None if count >= self.required_inputs else f"needs at least {self.required_inputs} inputs, got {count}"
        if not self.required_inputs <= count <= len(self.inputs):
            return f"takes inputs ({', '.join(self.inputs)}), got {count}"
        return None

    def complete_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and check every attribute's kind; raises OpError naming the attribute."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpError(f"op {self.name} has no attribute {sorted(unknown)}; it takes {sorted(self.attrs)}")
        out = {}
        for name, spec in self.attrs.items():
            value = attrs.get(name, spec.default)
            if value is REQUIRED:
                raise OpError(f"op {self.name} needs attribute {name!r} ({spec.kind})")
            if isinstance(value, list):
                value = tuple(value)
            if not spec.accepts(value):
                raise OpError(f"op {self.name}: attribute {name!r} must be {spec.kind}, got {value!r}")
            out[name] = value
        return out

    def infer_types(self, input_types: Sequence[TensorType | None], attrs: dict[str, Any]) -> tuple[TensorType, ...]:
        result = self.infer(*input_types, **attrs)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,)


OPS: Registry[OpSchema] = Registry("op", group="graphopt.ops", error=OpError,
                                   hint=" (register it with graphopt.ir.register_op)")


def register_op(name: str, *, inputs: Sequence[str], attrs: dict[str, Attr] | None = None,
                infer: Callable[..., Any], pure: bool = True, tags: Sequence[str] = (), replace: bool = False):
    """Decorator: register ``fn`` as the reference implementation of op ``name``.

    ``fn(*input_tensors, **attrs)`` must return a tensor (or a tuple for several outputs);
    ``infer(*input_types, **attrs)`` returns the output TensorType(s) and raises OpError when the
    inputs do not fit. Registering a name twice is an error unless ``replace=True``, so two
    plugins cannot silently clobber each other.
    """
    owner = sys._getframe(1).f_globals.get("__name__", "?")  # the registering module (fn may be torch's own)

    def wrap(fn):
        OPS.register(name, OpSchema(name, tuple(inputs), dict(attrs or {}), infer, fn, (fn.__doc__ or "").strip(),
                                    pure, frozenset(tags)), replace=replace, owner=owner)
        return fn
    return wrap


def get_op(name: str) -> OpSchema:
    return OPS.get(name)


def list_ops() -> list[str]:
    return OPS.names()
