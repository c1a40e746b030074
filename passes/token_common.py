"""Shared machinery of the token passes: re-deriving types after the token count changed,
checking attention masks, scoring tokens by one attention row, and removing dead nodes.

Changing the number of tokens in the middle of a graph changes the type of every value after
it, and the shape attributes captured with the old count (``reshape(x, [batch,197,6,64])``).
``retype`` walks the nodes in order, substitutes the old count by the new one in the shape
attributes of every node that reads a changed value, and infers the types again with the ops'
own rules, so the new counts are whatever those rules say (sympy expressions of the schedule).
"""
from __future__ import annotations

import math
from typing import Callable

import sympy
import torch

from graphopt.ir import Graph, Node, OpError, Value, get_op
from graphopt.ir.ops.opaque import is_pure
from graphopt.ir.structure import Attention, StructureError, Structure, analyze
from graphopt.ir.types import TensorType, canonical_dim, dims_equal


class TokenPassError(Exception):
    """The model does not have what a token pass needs; the message says what was not found."""


def structure_of(graph: Graph, pass_name: str) -> Structure:
    try:
        return analyze(graph)
    except StructureError as e:
        raise TokenPassError(f"{pass_name} needs transformer blocks (attention + MLP + residual adds), "
                             f"and none were recognised: {e}") from None


# ---- types after a token-count change -----------------------------------------------------
def _substitute(value, pairs: dict):
    """A shape/dim attribute with old token counts replaced by new ones."""
    if isinstance(value, tuple):
        return tuple(_substitute(v, pairs) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, sympy.Expr)):
        return value
    for old, new in pairs.items():
        if isinstance(old, int) and old <= 1:
            continue
        if dims_equal(value, old):
            return new
        if isinstance(value, sympy.Expr) and not value.is_Integer:
            if isinstance(old, sympy.Symbol) and old in value.free_symbols:
                return canonical_dim(value.subs(old, new))
            if isinstance(old, int) and isinstance(value, sympy.Mul) and sympy.Integer(old) in value.args:
                return canonical_dim(value / old * sympy.sympify(new))
    return value


def retype(graph: Graph, changed: dict[int, TensorType], fix: Callable[[Node, dict], bool] | None = None) -> int:
    """Re-infer the types of every node that reads a value whose type changed.

    ``changed`` maps id(value) -> its old type for the values already given a new type.
    ``fix(node, pairs)`` may rewrite a node whose new types do not fit (returns True when it did).
    Returns the number of nodes whose output types changed."""
    count = 0
    for node in graph.nodes:
        ins = [v for v in node.inputs if v is not None and id(v) in changed]
        if not ins:
            continue
        pairs: dict = {}
        for v in ins:
            for old, new in zip(changed[id(v)].shape, v.type.shape):
                if not dims_equal(old, new):
                    pairs.setdefault(old, new)
        schema = get_op(node.op)
        if node.op == "opaque":
            raise TokenPassError(f"{node.label()} (ATen {node.attrs['target']}, module "
                                 f"{node.meta.get('module', '?')!r}) reads a value whose token count changed, and an "
                                 "opaque node's output types are fixed at capture")
        attrs = {k: (_substitute(v, pairs) if schema.attrs[k].kind in ("shape", "dim") else v)
                 for k, v in node.attrs.items()}
        try:
            types = schema.infer_types([v.type if v is not None else None for v in node.inputs], attrs)
        except OpError as first:
            if fix is None or not fix(node, pairs):
                raise TokenPassError(f"after changing the token count, {node.label()} in module "
                                     f"{node.meta.get('module', '?')!r} no longer type-checks: {first}") from None
            attrs = {k: (_substitute(v, pairs) if schema.attrs[k].kind in ("shape", "dim") else v)
                     for k, v in node.attrs.items()}
            types = schema.infer_types([v.type if v is not None else None for v in node.inputs], attrs)
        node.attrs = schema.complete_attrs(attrs)
        for out, t in zip(node.outputs, types):
            if not out.type.matches(t):
                changed.setdefault(id(out), out.type)
                out.type = t
                count += 1
    return count


def set_type(value: Value, new: TensorType, changed: dict[int, TensorType]) -> None:
    changed.setdefault(id(value), value.type)
    value.type = new


def remove_dead(graph: Graph) -> int:
    node, removed = graph._tail, 0
    outputs = {id(v) for v in graph.outputs}
    while node is not None:
        prev = node.prev
        if is_pure(node) and all(not v.uses and id(v) not in outputs for v in node.outputs):
            graph.erase_node(node)
            removed += 1
        node = prev
    graph.remove_unused_constants()
    return removed


# ---- masks --------------------------------------------------------------------------------
def mask_is_trivial(mask: Value) -> bool | None:
    """True when the mask keeps every position (all True / all zero), False when it does not,
    None when it depends on the model's inputs (a padding mask) and cannot be known."""
    nodes, seen, stack = [], set(), [mask]
    while stack:
        v = stack.pop()
        if id(v) in seen or v.is_constant:
            continue
        seen.add(id(v))
        if v.producer is None:
            return None
        nodes.append(v.producer)
        stack.extend(i for i in v.producer.inputs if i is not None)
    graph = mask.producer.graph if mask.producer is not None else None
    order = {id(n): i for i, n in enumerate(graph.nodes)} if graph is not None else {}
    nodes = sorted(set(nodes), key=lambda n: order.get(id(n), 0))
    env: dict[int, torch.Tensor] = {}

    def one(attr):
        if isinstance(attr, tuple):
            return tuple(one(a) for a in attr)
        if isinstance(attr, sympy.Expr) and not isinstance(attr, sympy.Integer):
            return int(attr.subs({s: 1 for s in attr.free_symbols}))
        return attr

    for n in nodes:
        if n.op == "opaque":
            return None
        args = [env[id(v)] if id(v) in env else v.const for v in n.inputs]
        result = get_op(n.op).reference(*args, **{k: one(a) for k, a in n.attrs.items()})
        for out, t in zip(n.outputs, result if isinstance(result, tuple) else (result,)):
            env[id(out)] = t
    value = env[id(mask)] if id(mask) in env else mask.const
    return bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())


# ---- attention rows ------------------------------------------------------------------------
def attention_row(graph: Graph, attn: Attention, row: int | str, before: Node) -> Value:
    """The attention probabilities of one query position (``row``: an index or "last"), averaged
    over heads: f32[batch, tokens]. Built from the block's own q, k, scale and mask."""
    op = graph.op
    with graph.inserting_before(attn.probs.producer.next if attn.probs is not None else before):
        if attn.probs is not None:
            probs = attn.probs  # [B, H, N, N]
            n = probs.type.shape[-2]
            start = (n - 1) if row == "last" else row
            p_row = op.slice(probs, dim=-2, start=start, end=sympy.sympify(start) + 1)
        else:
            core = attn.core
            q, k = core.inputs[0], core.inputs[1]
            if q.type.rank != 4 or k.type.rank != 4:
                raise TokenPassError(f"attention {core.label()}: q {q.type} / k {k.type} are not [batch, heads, tokens, head]")
            if not dims_equal(q.type.shape[1], k.type.shape[1]):
                raise TokenPassError(f"attention {core.label()}: {q.type.shape[1]} query heads but {k.type.shape[1]} "
                                     "key heads (grouped-query attention) is not supported for scoring tokens")
            n = q.type.shape[-2]
            start = (n - 1) if row == "last" else row
            q_row = op.slice(q, dim=2, start=start, end=sympy.sympify(start) + 1)
            scale = core.attrs["scale"] if core.attrs["scale"] is not None else 1.0 / math.sqrt(int(q.type.shape[-1]))
            scores = op.mul(op.matmul(q_row, op.permute(k, dims=(0, 1, 3, 2))),
                            graph.add_constant(torch.tensor(scale, dtype=q.type.dtype), "attn_row_scale"))
            mask = core.inputs[3] if len(core.inputs) > 3 else None
            if core.attrs["is_causal"] and row != "last":
                raise TokenPassError(f"attention {core.label()} is causal: only the last query row sees every token")
            if mask is not None:
                m = mask
                if m.type.rank == 4 and not dims_equal(m.type.shape[-2], 1):
                    m = op.slice(m, dim=2, start=start, end=sympy.sympify(start) + 1)
                if m.type.dtype == torch.bool:
                    scores = op.where(m, scores, graph.add_constant(torch.tensor(float("-inf"), dtype=q.type.dtype), "neg_inf"))
                else:
                    scores = op.add(scores, m)
            p_row = op.softmax(scores, dim=-1)
        mean = op.mean(p_row, dims=(1,), keepdim=False)  # [B, 1, N]
        return op.reshape(mean, shape=(mean.type.shape[0], mean.type.shape[-1]))
