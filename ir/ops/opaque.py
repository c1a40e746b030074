"""Opaque ops: an ATen op the IR has no op for. It keeps its target and argument structure,
its output types are fixed at capture, and it runs unchanged in the torch backend, so
unknown ops are never dropped and never approximated."""
from __future__ import annotations

import torch

from graphopt.ir.opdef import Attr, OpError, register_op


class TensorArg:
    """Placeholder for the i-th tensor input inside an opaque node's argument template."""
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"${self.index}"

    def __eq__(self, other):
        return isinstance(other, TensorArg) and other.index == self.index

    def __hash__(self):
        return hash(("TensorArg", self.index))


def resolve_target(qualified: str):
    """'aten::index.Tensor' -> torch.ops.aten.index.Tensor"""
    namespace, _, rest = qualified.partition("::")
    name, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        raise OpError(f"opaque op target {qualified!r} is not available in this torch build") from None


def fill_template(template, tensors):
    if isinstance(template, TensorArg):
        return tensors[template.index]
    if isinstance(template, (list, tuple)):
        return type(template)(fill_template(t, tensors) for t in template)
    if isinstance(template, dict):
        return {k: fill_template(v, tensors) for k, v in template.items()}
    return template


def _opaque_type(*inputs, target, args, kwargs, out_types):
    try:
        mutable = resolve_target(target)._schema.is_mutable
    except OpError:  # a target this torch build lacks: running it will say so
        return out_types
    if mutable:  # the IR is functional: a pass would fold or share what such an op writes
        raise OpError(f"opaque op {target} writes to its inputs in place; functionalize the program first "
                      "(the torch frontend does: ExportedProgram.run_decompositions({}))")
    return out_types


@register_op("opaque", inputs=["*inputs"],
             attrs={"target": Attr("str", doc="qualified ATen name, e.g. aten::index.Tensor"),
                    "args": Attr("any", (), "positional template; TensorArg(i) marks input i"),
                    "kwargs": Attr("any", None), "out_types": Attr("types")},
             infer=_opaque_type, pure=False)
def opaque(*inputs, target, args, kwargs, out_types):
    result = resolve_target(target)(*fill_template(args, inputs), **fill_template(kwargs or {}, inputs))
    return tuple(result) if isinstance(result, (list, tuple)) else result


def is_pure(node) -> bool:
    """Free of side effects and randomness, so it may be removed when unused or merged when equal."""
    from graphopt.ir.opdef import get_op
    if node.op == "onnx_opaque":
        from graphopt.ir.ops.onnx_opaque import is_pure_onnx
        return is_pure_onnx(node)
    if node.op != "opaque":
        return get_op(node.op).pure
    target = resolve_target(node.attrs["target"])
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
