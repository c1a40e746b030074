"""Shared machinery of the token passes: re-deriving types after the token count changed,
checking attention masks, scoring tokens by one attention row, and removing dead nodes.

Changing the number of tokens in the middle of a graph changes the type of every value after
it, and the shape attributes captured with the old count (``reshape(x, [batch,197,6,64])``).
``retype`` walks the nodes in order, follows the changed axes by position into the shape
attributes of every node that reads a changed value (never by matching the old size: a head size
can equal the token count), and infers the types again with the ops' own rules, so the new counts
are whatever those rules say (sympy expressions of the schedule).
"""
from __future__ import annotations

import math
from typing import Callable

import sympy
import torch

from graphopt.ir import Graph, Node, OpError, Value, get_op
from graphopt.ir.ops.opaque import is_pure
from graphopt.ir.structure import Attention, StructureError, Structure, analyze, reshape_groups
from graphopt.ir.traversal import ancestors
from graphopt.ir.types import TensorType, canonical_dim, dims_equal, normalize_axis


class TokenPassError(Exception):
    """The model does not have what a token pass needs; the message says what was not found."""


def structure_of(graph: Graph, pass_name: str) -> Structure:
    try:
        return analyze(graph)
    except StructureError as e:
        raise TokenPassError(f"{pass_name} needs transformer blocks (attention + MLP + residual adds), "
                             f"and none were recognised: {e}") from None


def refused_after(ops: tuple[str, ...], reason: str) -> Callable[[Graph], str | None]:
    """A pass's ``requires`` check: ``reason`` when the graph has a node of one of ``ops`` (what an
    earlier token pass inserted), else None."""
    def check(graph: Graph) -> str | None:
        return reason if any(graph.find_nodes(op) for op in ops) else None
    return check


def refuse_grid_bound(blocks, pass_name: str, action: str) -> None:
    """Token reduction needs blocks whose attention and MLP see a free set of tokens; a block that
    lays its tokens out on the image grid (Swin's windows, SegFormer's strided K/V conv and Mix-FFN
    conv) has no grid left once tokens are ``action`` (merged / dropped)."""
    for b in blocks:
        if b.grid:
            raise TokenPassError(f"{pass_name}: block {b.index} ({b.module or b.attention.core.label()}) needs its "
                                 f"tokens on the fixed image grid: {'; '.join(b.grid)}. Once tokens are {action} there "
                                 f"is no grid, so {pass_name} does not apply to this model")


# ---- types after a token-count change -----------------------------------------------------
Moved = dict[int, list[tuple[int, object, object]]]  # input index -> [(axis, old size, new size)]


def _moved_axes(node: Node, changed: dict[int, TensorType]) -> Moved:
    """Which axes of which inputs changed size, by position (old type against new type)."""
    moved: Moved = {}
    for i, v in enumerate(node.inputs):
        if v is not None and id(v) in changed and changed[id(v)].rank == v.type.rank:
            axes = [(a, o, n) for a, (o, n) in enumerate(zip(changed[id(v)].shape, v.type.shape)) if not dims_equal(o, n)]
            if axes:
                moved[i] = axes
    return moved


def _follow(value, old, new):
    """A slice bound or index on the token axis in terms of the new count: the old count itself
    (a slice to the end) becomes the new one, an offset from a symbolic count (``n - 1``) keeps its
    offset; any other literal (``x[:, 1:]``, ``x[:, 0]``) stays as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, sympy.Expr)):
        return value
    if dims_equal(value, old):
        return new
    if isinstance(old, sympy.Expr) and not old.is_Integer and isinstance(value, sympy.Expr) and not value.is_Integer:
        offset = sympy.simplify(value - old)
        if offset.is_Integer:
            return canonical_dim(sympy.sympify(new) + offset)
    return value


def _where(node: Node) -> str:
    return f"{node.label()} in module {node.meta.get('module', '?')!r}"


def _reshape_attrs(node: Node, moved: Moved, changed: dict[int, TensorType]) -> dict:
    """The reshape's target with the token axis followed through the reshape by position."""
    x = node.inputs[0]
    old_in, old_out = changed[id(x)].shape, node.output.type.shape
    groups = reshape_groups(old_in, old_out)
    if groups is None:
        raise TokenPassError(f"{_where(node)}: cannot tell which axes of reshape {list(map(str, old_in))} -> "
                             f"{list(map(str, old_out))} carry the token count")
    axes = {a for a, _, _ in moved[0]}
    shape = list(node.attrs["shape"])
    for src, dst in groups:
        if not axes & set(src):
            continue
        wide = [a for a in dst if not dims_equal(old_out[a], 1)]
        if len(wide) != 1:
            raise TokenPassError(f"{_where(node)}: reshape {list(map(str, old_in))} -> {list(map(str, old_out))} "
                                 f"splits the token axis into {len(wide)} axes; the token count cannot be followed")
        a = wide[0]
        if not (isinstance(shape[a], int) and shape[a] == -1):
            shape[a] = canonical_dim(sympy.Mul(*[sympy.sympify(x.type.shape[s]) for s in src]))
    return {**node.attrs, "shape": tuple(shape)}


def _axis_attrs(node: Node, moved: Moved) -> dict:
    """Shape / index attributes of the layout ops, rewritten on the axes whose size changed."""
    attrs = dict(node.attrs)
    x = node.inputs[0]
    axes = {a: (o, n) for a, o, n in moved.get(0, [])}
    if node.op in ("slice", "select"):
        a = normalize_axis(attrs["dim"], x.type.rank)
        if a in axes:
            for key in ("start", "end", "index"):
                if key in attrs:
                    attrs[key] = _follow(attrs[key], *axes[a])
    elif node.op == "expand":
        shape, lead = list(attrs["shape"]), len(attrs["shape"]) - x.type.rank
        for a, (old, new) in axes.items():
            if not (isinstance(shape[a + lead], int) and shape[a + lead] == -1):
                shape[a + lead] = new
        attrs["shape"] = tuple(shape)
    elif node.op == "layer_norm":
        shape, lead = list(attrs["normalized_shape"]), x.type.rank - len(attrs["normalized_shape"])
        for a, (old, new) in axes.items():
            if a >= lead:
                shape[a - lead] = new
        attrs["normalized_shape"] = tuple(shape)
    return attrs


SIZE_ATTR_OPS = {"reshape", "slice", "select", "expand", "layer_norm"}


def _new_attrs(node: Node, moved: Moved, changed: dict[int, TensorType]) -> dict:
    if node.op == "reshape" and 0 in moved:
        return _reshape_attrs(node, moved, changed)
    if node.op in SIZE_ATTR_OPS:
        return _axis_attrs(node, moved)
    schema = get_op(node.op)
    olds = [o for axes in moved.values() for _, o, _ in axes]
    for k, v in node.attrs.items():
        if schema.attrs[k].kind in ("shape", "dim") and v is not None:
            for d in (v if isinstance(v, tuple) else (v,)):
                if isinstance(d, (int, sympy.Expr)) and not isinstance(d, bool) and any(dims_equal(d, o) for o in olds):
                    raise TokenPassError(f"{_where(node)} reads a value whose token count changed, and its attribute "
                                         f"{k}={v} may or may not be that count; the token passes cannot tell which")
    return node.attrs


def retype(graph: Graph, changed: dict[int, TensorType], fix: Callable[[Node, Moved], bool] | None = None) -> int:
    """Re-infer the types of every node that reads a value whose type changed.

    ``changed`` maps id(value) -> its old type for the values already given a new type. Shape
    attributes follow the changed axes by position through each op (a reshape's axis groups, a
    slice's axis), never by comparing sizes: in ``reshape(x, [batch, 16, 4, 16])`` only the 16
    that is x's token axis is the token count. ``fix(node, moved)`` may rewrite a node whose new
    types do not fit (returns True when it did). Returns the number of nodes whose output types changed."""
    count = 0
    for node in graph.nodes:
        moved = _moved_axes(node, changed)
        if not moved:
            continue
        schema = get_op(node.op)
        if node.op == "opaque":
            raise TokenPassError(f"{node.label()} (ATen {node.attrs['target']}, module "
                                 f"{node.meta.get('module', '?')!r}) reads a value whose token count changed, and an "
                                 "opaque node's output types are fixed at capture")
        attrs = _new_attrs(node, moved, changed)
        try:
            types = schema.infer_types([v.type if v is not None else None for v in node.inputs], attrs)
        except OpError as first:
            if fix is None or not fix(node, moved):
                raise TokenPassError(f"after changing the token count, {_where(node)} no longer type-checks: "
                                     f"{first}") from None
            moved = _moved_axes(node, changed)
            attrs = _new_attrs(node, moved, changed)
            types = schema.infer_types([v.type if v is not None else None for v in node.inputs], attrs)
        node.attrs = schema.complete_attrs(attrs)
        for out, t in zip(node.outputs, types):
            if not out.type.matches(t):
                changed.setdefault(id(out), out.type)
                out.type = t
                count += 1
    return count


def aligned_axes(node: Node, i: int, moved: Moved) -> list[int]:
    """The axes of input ``i`` that line up with the changed axes of the other inputs: by
    broadcasting for elementwise ops, as (query, key) rows and columns for an sdpa mask. [] for
    other ops: they give no such correspondence, and the node's type error is reported as it is."""
    v = node.inputs[i]
    if node.op == "sdpa" and i == 3:
        q_rank = node.inputs[0].type.rank
        axes = set()
        for j, col in ((0, -2), (1, -1), (2, -1)):
            if any(a == q_rank - 2 for a, _, _ in moved.get(j, [])):
                axes.add(v.type.rank + col)
    elif "elementwise" in get_op(node.op).tags:
        axes = {a - node.inputs[j].type.rank + v.type.rank for j, moves in moved.items() for a, _, _ in moves}
    else:
        return []
    return sorted(a for a in axes if a > 0 and not dims_equal(v.type.shape[a], 1))


def set_type(value: Value, new: TensorType, changed: dict[int, TensorType]) -> None:
    changed.setdefault(id(value), value.type)
    value.type = new


# ---- masks --------------------------------------------------------------------------------
_PER_TOKEN = "; merged tokens cannot keep a per-token mask"
MASK_REFUSALS = {"inputs": "depends on the inputs (a padding mask)" + _PER_TOKEN,
                 "unknown": "cannot be evaluated" + _PER_TOKEN, "masks": "masks some positions" + _PER_TOKEN,
                 "bias": "adds a position-dependent bias (a relative position bias, as in BEiT); a merged token "
                         "has no single position to look the bias up at"}  # why token_merge refuses, by mask_verdict


def mask_verdict(mask: Value) -> str:
    """"trivial" when the mask keeps every position equally (all True / all zero), "masks" when
    it blocks some positions (False / -inf), "bias" when it adds other values (a relative position
    bias), "inputs" when it depends on the model's inputs (a padding mask), "unknown" when an
    impure op computes it."""
    nodes = list(ancestors(mask))
    if any(v.producer is None and not v.is_constant
           for v in [mask, *(i for n in nodes for i in n.inputs if i is not None)]):
        return "inputs"
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
        if not is_pure(n):
            return "unknown"
        args = [env[id(v)] if id(v) in env else v.const for v in n.inputs]
        result = get_op(n.op).reference(*args, **{k: one(a) for k, a in n.attrs.items()})
        for out, t in zip(n.outputs, result if isinstance(result, tuple) else (result,)):
            env[id(out)] = t
    value = env[id(mask)] if id(mask) in env else mask.const
    if value.dtype == torch.bool:
        return "trivial" if bool(value.all()) else "masks"
    if bool((value == 0).all()):
        return "trivial"
    return "masks" if bool(((value == 0) | (value <= -1e4)).all()) else "bias"


# ---- attention rows ------------------------------------------------------------------------
def attention_row(graph: Graph, attn: Attention, row: int | str, before: Node) -> Value:
    """The attention probabilities of one query position (``row``: an index or "last"), averaged
    over heads, or with ``row="all"`` the attention each token receives averaged over every query
    and head (for encoders without a CLS token): f32[batch, tokens]. Built from the block's own
    q, k, scale and mask."""
    op = graph.op
    with graph.inserting_before(attn.probs.producer.next if attn.probs is not None else before):
        if attn.probs is not None:
            probs = attn.probs  # [B, H, N, N]
            n = probs.type.shape[-2]
            start = (n - 1) if row == "last" else row
            p_row = probs if row == "all" else op.slice(probs, dim=-2, start=start, end=sympy.sympify(start) + 1)
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
            q_row = q if row == "all" else op.slice(q, dim=2, start=start, end=sympy.sympify(start) + 1)
            scale = core.attrs["scale"] if core.attrs["scale"] is not None else 1.0 / math.sqrt(int(q.type.shape[-1]))
            scores = op.mul(op.matmul(q_row, op.permute(k, dims=(0, 1, 3, 2))),
                            graph.add_constant(torch.tensor(scale, dtype=q.type.dtype), "attn_row_scale"))
            mask = core.inputs[3] if len(core.inputs) > 3 else None
            if core.attrs["is_causal"] and row != "last":
                raise TokenPassError(f"attention {core.label()} is causal: only the last query row sees every token")
            if mask is not None:
                m = mask
                if m.type.rank == 4 and not dims_equal(m.type.shape[-2], 1) and row != "all":
                    m = op.slice(m, dim=2, start=start, end=sympy.sympify(start) + 1)
                if m.type.dtype == torch.bool:
                    scores = op.where(m, scores, graph.add_constant(torch.tensor(float("-inf"), dtype=q.type.dtype), "neg_inf"))
                else:
                    scores = op.add(scores, m)
            p_row = op.softmax(scores, dim=-1)
        if row == "all":
            return op.mean(p_row, dims=(1, 2), keepdim=False)  # [B, N]
        mean = op.mean(p_row, dims=(1,), keepdim=False)  # [B, 1, N]
        return op.reshape(mean, shape=(mean.type.shape[0], mean.type.shape[-1]))
