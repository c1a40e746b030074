"""Token merging and integer-only arithmetic, in either order.

``token_merge`` then ``integer_only``: ``CONVERTERS`` give integer_only's converter integer forms of
what token_merge inserted: ``full`` (sizes = 1), ``mean`` (keys averaged over heads -> an int32 sum
with the scale divided by the count), ``token_merge`` -> ``int.token_merge`` and ``log`` (of sizes,
for proportional attention) -> an ``int.lookup`` table. ``scores + log(sizes)`` before a softmax
becomes Shiftmax's input plus ``round(X log2(size))``, as below (one rounding, no ``int.add`` chain).

``integer_only`` then ``token_merge``: ``merge_integer_graph`` finds the blocks of the integer graph
(each ``int.shiftmax`` and the first ``int.add`` after it: the attention residual) and inserts
``int.token_merge`` there, with proportional attention as ``round(X log2(size))`` added to the
Shiftmax input (whose scale is 1 / (X log2 e)).
"""
from __future__ import annotations

import math

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.ir.ops.integer_tokens import SCORE_BITS
from graphopt.ir.ops.tokens import merged_count
from graphopt.ir.structure import constant_derived
from graphopt.ir.traversal import descendants
from graphopt.ir.types import dims_equal
from graphopt.passes.integer_only.form import Q
from graphopt.passes.token_common import MASK_REFUSALS, TokenPassError, mask_verdict, retype

I32 = torch.int32
KEY_BOUNDS = {torch.int8: 128, torch.int32: 2 ** 15}  # integer_only's i8 keys; 16-bit i32 tensors


def key_shift(bound: int, head_size: int) -> int:
    """Right shift keeping head_size * (bound >> shift)^2 < 2^21, so integer scores stay exact in int64."""
    shift = 0
    while head_size * ((bound >> shift) + 1) ** 2 >= 2 ** ((63 - SCORE_BITS) // 2):
        shift += 1
    return shift


# ---- token_merge, then integer_only ------------------------------------------------------------
def _plain(conv, v: Value):
    """v's integer form as per-tensor, zero-point-0 int (requantized to i32 when it is not)."""
    q = conv.q.get(id(v))
    if q is None:
        return None
    if q.kind in ("i8", "i32") and q.zp == 0 and q.per_tensor and q.offset is None:
        return q
    return conv.to_kind(v, "i32")


def _full(conv, node) -> bool:
    value = node.attrs["value"]
    if not isinstance(value, (int, float)) or not 0 < value < math.inf:
        return False
    out = conv.g.op("full", shape=node.attrs["shape"], value=1, dtype=I32)
    return conv.set(node, _q(conv, out, float(value), 1))


def _mean(conv, node) -> bool:
    x = node.inputs[0]
    q = _plain(conv, x)
    dims = node.attrs["dims"]
    sizes = [x.type.shape[d] for d in dims]
    if q is None or not dims or not all(isinstance(s, int) for s in sizes):
        return False
    count = math.prod(sizes)
    if q.bound * count >= 2 ** 31:
        return False
    out = conv.g.op("sum", q.value, dims=dims, keepdim=node.attrs["keepdim"], dtype=I32)
    return conv.set(node, _q(conv, out, q.scale.item() / count, q.bound * count))


def _log(conv, node) -> bool:
    """log of a positive integer-valued tensor with a small bound (token sizes): a lookup table."""
    x = node.inputs[0]
    q = _plain(conv, x)
    stats = conv.stats.get(x.name)
    if q is None or q.bound > 2 ** 16 or stats is None or stats.lo <= 0:
        return False
    t = torch.log(torch.arange(q.bound + 1, dtype=torch.float64).clamp_min(1) * q.scale.item())
    s_out = t.abs().max().item() / (2 ** 15 - 1) or 1.0
    table = conv.const(torch.round(t / s_out).to(I32), "log_table")
    return conv.set(node, _q(conv, conv.g.op("int.lookup", q.value, table), s_out, 2 ** 15 - 1))


def is_merge_metric(node: Node) -> bool:
    """Whether node is token_merge's metric, the keys averaged over heads: it reads the i8 keys the attention's
    QK^T reads (summed in int32), so the K projection writes one form, with no second requant."""
    return node.op == "mean" and bool(node.output.uses) and all(u.op == "token_merge" and i == 1
                                                                 for u, i in node.output.uses)


def log_of_sizes(conv, bias: Value) -> Q | None:
    """The integer token sizes [B, N, 1] whose log ``bias`` [B, 1, 1, N] is (through reshapes: token_merge's
    proportional-attention bias), else None."""
    v = bias
    while v.producer is not None and v.producer.op == "reshape":
        v = v.producer.inputs[0]
    if v.producer is None or v.producer.op != "log":
        return None
    q = conv.q.get(id(v.producer.inputs[0]))
    if q is None or q.kind != "i32" or q.scale.item() != 1.0 or q.zp or q.offset is not None:
        return None
    shape, want = q.value.type.shape, bias.type.shape
    if len(shape) != 3 or shape[2] != 1 or len(want) != 4 or \
            not all(dims_equal(a, b) for a, b in zip(want, (shape[0], 1, 1, shape[1]))):
        return None
    return q


def _token_merge(conv, node) -> bool:
    if len(node.inputs) > 3:
        return False  # keep_order's source matrix stays in float
    x, keys, sizes = node.inputs
    xq, kq, sq = _plain(conv, x), _plain(conv, keys), conv.q.get(id(sizes))
    if xq is None or kq is None or sq is None or sq.scale.item() != 1.0 or sq.zp or sq.offset is not None:
        return False
    n = x.type.shape[1]
    shift = key_shift(kq.bound, int(keys.type.shape[-1]))
    merged, new_sizes = conv.g.create_node("int.token_merge", [xq.value, kq.value, sq.value],
                                           {**node.attrs, "shift": shift}).outputs
    total = sq.bound if sizes.producer is not None and sizes.producer.op == "token_merge" else sq.bound * int(n)
    conv.q[id(node.outputs[0])] = _q(conv, merged, xq.scale.item(), xq.bound)
    conv.q[id(node.outputs[1])] = _q(conv, new_sizes, 1.0, total)
    return True


def _q(conv, value: Value, scale: float, bound: int):
    return Q(value, torch.tensor(scale, dtype=torch.float64), None, 0, int(bound), "i32")


CONVERTERS = {"full": _full, "mean": _mean, "log": _log, "token_merge": _token_merge}


# ---- integer_only, then token_merge ------------------------------------------------------------
def merge_integer_graph(graph: Graph, ctx, rs_of, prop_attn: bool, protect: int, keep_order: bool, stack: int) -> None:
    """token_merge on a graph integer_only produced; ``rs_of(num_blocks)`` gives r per block."""
    if keep_order or stack != 0:
        raise TokenPassError("token_merge on an integer-only graph supports neither keep_order nor stack != 0; "
                             "run token_merge before integer_only for those")
    blocks = [_int_block(graph, s) for s in _self_attention(graph)]
    rs = rs_of(len(blocks))
    if not any(rs):
        ctx.note("r is 0 in every block: graph unchanged")
        return
    if protect < 0:
        protect = _leading_special_tokens(graph, blocks[0][1])
    graph.meta["leading_tokens_kept"] = protect
    sizes, counts, total = None, [], None
    for (shiftmax, stream, keys), r_i in zip(blocks, rs):
        n = stream.type.shape[1]
        counts.append(n)
        if sizes is not None and prop_attn:
            _integer_proportional_attention(graph, shiftmax, sizes, total)
        if r_i == 0:
            continue
        op = graph.op
        with graph.inserting_after(stream.producer):
            k_sum = op.sum(keys, dims=(1,), keepdim=False, dtype=I32)  # [B, N, d]: heads summed
            if sizes is None:
                total = int(n)
                sizes = op.full(shape=(stream.type.shape[0], n, 1), value=1, dtype=I32)
            heads, bound = int(keys.type.shape[1]), KEY_BOUNDS[keys.type.dtype]
            node = graph.create_node("int.token_merge", [stream, k_sum, sizes],
                                     {"r": r_i, "protected": protect, "shift": key_shift(heads * bound, int(keys.type.shape[-1]))})
        merged, sizes = node.outputs
        for user, i in list(stream.uses):
            if user is not node:
                graph.set_input(user, i, merged)
        graph.outputs = [merged if v is stream else v for v in graph.outputs]
        retype(graph, {id(merged): stream.type})
        ctx.count("blocks_merged")
    graph.remove_dead()
    ctx.note(f"integer graph: r per block {rs}; tokens entering each block {[str(c) for c in counts]}, leaving the "
             f"last {merged_count(counts[-1], rs[-1], protect)}")


def _self_attention(graph: Graph) -> list[Node]:
    """The int.shiftmax of each block: scores [.., N, N] (every token attends to every token). An attention with
    other scores (SigLIP's pooling head: one probe query) after the last block reads the merged tokens as the float
    pass leaves it; one before it is refused (its tokens are not the stream's)."""
    shiftmax = graph.find_nodes("int.shiftmax")
    square = [dims_equal(s.inputs[0].type.shape[-1], s.inputs[0].type.shape[-2]) for s in shiftmax]
    last = max((i for i, sq in enumerate(square) if sq), default=-1)
    for s, sq in zip(shiftmax[:last], square):
        if not sq:
            raise TokenPassError(f"token_merge: integer attention {s.label()} (module {s.meta.get('module', '?')!r}) "
                                 f"has scores {s.inputs[0].type}, not one row per token, before the last block; "
                                 "run token_merge before integer_only")
    return [s for s, sq in zip(shiftmax, square) if sq]


def _int_block(graph: Graph, shiftmax) -> tuple:
    """(shiftmax, residual stream after attention, keys [B, H, N, d]) of one integer attention block."""
    where = f"{shiftmax.label()} (module {shiftmax.meta.get('module', '?')!r})"
    rq = shiftmax.inputs[0].producer
    qk = rq.inputs[0].producer if rq is not None and rq.op == "int.requant" else None
    keys = _transposed(qk.inputs[1]) if qk is not None and qk.op == "int.matmul" else None
    if keys is None:
        raise TokenPassError(f"token_merge: integer attention {where} is not int.shiftmax(int.requant(int.matmul(q, "
                             "permute(k)))); run token_merge before integer_only")
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    adds = [n for n in descendants(shiftmax.output, through=lambda n: n.op != "int.add") if n.op == "int.add"]
    if not adds:
        raise TokenPassError(f"token_merge: no residual int.add after integer attention {where}")
    residual = min(adds, key=lambda n: order[id(n)])
    if residual.output.type.rank != 3 or residual.output.type.dtype != I32:
        raise TokenPassError(f"token_merge: the stream after integer attention {where} is {residual.output.type}, "
                             "not i32 [batch, tokens, hidden]")
    mask = shiftmax.inputs[1] if len(shiftmax.inputs) > 1 else None
    verdict = mask_verdict(mask) if mask is not None else "trivial"
    if verdict != "trivial":
        raise TokenPassError(f"token_merge: integer attention {where}: its mask %{mask.name} {MASK_REFUSALS[verdict]}")
    if keys.type.dtype not in KEY_BOUNDS:
        raise TokenPassError(f"token_merge: keys of integer attention {where} are {keys.type}, not i8/i32 without "
                             "a zero point; run token_merge before integer_only")
    return shiftmax, residual.output, keys


def _transposed(kt: Value) -> Value | None:
    """The keys [B, H, N, d] whose transpose kt is: permute(k, (0, 1, 3, 2)), or as the exact exporter writes it,
    reshape(permute(reshape(k, [B H, N, d]), (0, 2, 1)), [B, H, d, N]) with a per-tensor int.requant after it."""
    node = kt.producer
    if node is not None and node.op == "permute" and tuple(node.attrs["dims"]) == (0, 1, 3, 2):
        return node.inputs[0]
    m = node.inputs[1] if node is not None and node.op == "int.requant" else None
    if m is not None and m.is_constant and m.const.numel() == 1:        # per tensor: it commutes with the layout
        node = node.inputs[0].producer
    chain = []
    for op in ("reshape", "permute", "reshape"):
        if node is None or node.op != op:
            return None
        chain.append(node)
        node = node.inputs[0].producer
    keys = chain[-1].inputs[0]
    if tuple(chain[1].attrs["dims"]) != (0, 2, 1) or keys.type.rank != 4 or chain[0].output.type.rank != 4:
        return None
    b, h, n, d = keys.type.shape
    flat, out = chain[2].output.type.shape, chain[0].output.type.shape
    same = all(dims_equal(x, y) for x, y in zip(tuple(out) + tuple(flat[1:]), (b, h, d, n, n, d)))
    return keys if same else None


def _leading_special_tokens(graph: Graph, first_stream: Value) -> int:
    """Tokens the stream's ``cat`` puts before the patch tokens from a constant (CLS, distillation); 0 when no
    tensor of tokens is concatenated along the token axis anywhere (patch tokens only, as in SigLIP)."""
    cats = [n for n in graph.nodes if n.op == "cat" and n.attrs["dim"] % 3 == 1 and n.output.type.rank == 3]
    if not cats:
        return 0
    count = 0
    for v in cats[0].inputs:
        if not constant_derived(v):
            break
        count += int(v.type.shape[1])
    if 0 < count < len(cats[0].inputs) and count < int(first_stream.type.shape[1]):
        return count
    raise TokenPassError("token_merge: no CLS/distillation token found in the integer graph (a cat of constant "
                         "tokens before the patches); give protect=N for the number of leading tokens to keep")


def _integer_proportional_attention(graph: Graph, shiftmax, sizes: Value, total: int) -> None:
    with graph.inserting_before(shiftmax):
        x = add_log2_sizes(graph, shiftmax.inputs[0], sizes, total, shiftmax.attrs["X"])
    graph.set_input(shiftmax, 0, x)


def add_log2_sizes(graph: Graph, x: Value, sizes: Value, total: int, X: int) -> Value:
    """Shiftmax input x + round(X log2(size)) per key: log(size) in x's units (scale 1 / (X log2 e)).
    ``sizes``: [B, N, 1] token sizes up to ``total``."""
    table = torch.round(X * torch.log2(torch.arange(total + 1, dtype=torch.float64).clamp_min(1))).to(I32)
    s = graph.op.reshape(sizes, shape=(sizes.type.shape[0], 1, 1, sizes.type.shape[1]))
    return graph.op.add(x, graph.op("int.lookup", s, graph.add_constant(table, "log2_size_table")))
