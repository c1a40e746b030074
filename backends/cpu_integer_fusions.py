"""``cpu_integer``'s fusions: chains of ``int.*`` ops become one fused kernel op (``cpu_integer_ops``).

Each is a rewrite rule (pattern / check that fails with a reason / rewrite), registered on the
kernel layer in priority order, longest chains first, so ``why_not`` says why a chain stayed unfused:

    int.requant(int.shiftgelu(int.requant(int.linear(x, w[, b]), m, c)), m2, c2) -> cpu.int_gemm(kind=table | table_requant)
    int.requant(int.linear(x, w[, b]), m, c)                                   -> cpu.int_gemm(kind=requant)
      several of these on one x with equal requant attributes (attention's q, k, v) -> one cpu.int_gemm, sliced
      (requants differing only in the shift k: the same, with the shift per column)
    int.add(int.linear(x, w[, b]), res, ma, mb, c)  (either operand order)     -> cpu.int_gemm(kind=add)
    int.linear(x, w[, b])                                                      -> cpu.int_gemm(kind=raw)
    the same epilogues (not add) after int.conv2d with stride == kernel        -> im2col reshape + cpu.int_gemm
    int.shiftmax(int.requant(int.matmul(a, bm), m, c)[, mask])                 -> cpu.int_bmm(kind=requant, + Shiftmax)
    the same with add(scores, int.lookup(sizes, table)) before int.shiftmax    -> cpu.int_bmm(+ proportional attention)
    int.shiftmax(int.requant(int.add(int.matmul(a, bm), [reshape] int.lookup(sizes, table))))
                                                  (token_merge before integer_only) -> cpu.int_bmm(kind=add_requant)
    int.requant(int.matmul(a, bm), m, c) ; int.matmul(a, bm)                   -> cpu.int_bmm(kind=requant | raw)
    int.requant(int.layernorm(x), m, c) ; int.layernorm(x)                     -> cpu.int_layernorm
    int.shiftmax([add(x, int.lookup(sizes, table)) | x][, mask])                -> cpu.int_shiftmax
    int.requant(x, m, c) ; int.add(a, b, ma, mb, c)                            -> cpu.int_requant / int_add
    int.token_merge(x, keys, sizes)                                            -> cpu.int_token_merge
    int.quantize(x) ; int.dequantize(x, scale[, offset])                       -> cpu.int_quantize / int_dequantize

Epilogue constants must vary at most along the output's column axis (per-column vectors). The
kernels read ``threads`` from their attribute, which the backend sets after fusing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import graphopt.backends.cpu_integer_ops  # noqa: F401  (registers the cpu.* ops)
from graphopt.backends import cpu_integer_library as kernels
from graphopt.backends.kernels import register_fusion
from graphopt.ir import Node, Value
from graphopt.ir.ops.integer import requant, shift_pow2, shiftgelu
from graphopt.ir.pattern import either
from graphopt.ir.rewrite import Rule

TARGET = "cpu_integer"
I32 = torch.int32
MAX_TABLE = 1 << 20   # entries of a requant(shiftgelu(.)) table folded into a GEMM epilogue


def _wrap_i32(t: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 modulo 2^32 (the int32 arithmetic every backend does)."""
    return (((t.to(torch.int64) + 2 ** 31) % 2 ** 32) - 2 ** 31).to(I32)


def _per_column(v: Value | None, n: int, axis: int = -1) -> torch.Tensor | None:
    """A constant that varies at most along ``axis`` (of its broadcast), as an int32 vector of n."""
    if v is None or not v.is_constant:
        return None
    t = v.const
    if t.numel() == 1:
        return t.reshape(1).to(I32).expand(n).contiguous()
    if t.dim() < -axis or t.shape[axis] != n or t.numel() != n:
        return None
    return t.reshape(n).to(I32).contiguous()


def _requant_attrs(node: Node) -> dict:
    a = node.attrs
    return {"pre": a["pre"], "k": a["k"], "lo": a["lo"], "hi": a["hi"], "zp": a["zero_point"], "out": a["dtype"]}


def _pow2_table(X: int, n: int) -> torch.Tensor:
    return shift_pow2(torch.arange(0, n * X + 1, dtype=I32), X, n).to(I32).contiguous()


@dataclass
class Epilogue:
    """What a GEMM finishes in its epilogue: kernel attributes and per-column constants / residual."""
    attrs: dict = field(default_factory=lambda: {"kind": "raw", "out": "i32"})
    m: torch.Tensor | None = None
    c: torch.Tensor | None = None
    table: torch.Tensor | None = None
    res: Value | None = None
    mb: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    c2: torch.Tensor | None = None


def epilogue(chain: list[Node], n: int, axis: int, tables: bool) -> Epilogue | str:
    """The epilogue of ``chain`` (the producer, then the matched ops after it, in order), or why it
    cannot be one. ``tables=False`` skips building the Shiftgelu table (a check only needs to know
    that it can be built)."""
    produced, chain = chain[0].output, chain[1:]
    ops = tuple(node.op for node in chain)
    if not ops:
        return Epilogue()
    first = chain[0]
    if ops[0] == "int.add":
        mine = 0 if first.inputs[0] is produced else 1
        other = first.inputs[1 - mine]
        ma, mb, c = _per_column(first.inputs[2 + mine], n), _per_column(first.inputs[3 - mine], n), \
            _per_column(first.inputs[4], n)
        if axis != -1:
            return "the residual add is fused only after a linear layer"
        if other.type.shape != first.inputs[mine].type.shape:
            return f"{first.label()}: the residual operand is broadcast"
        if None in (ma, mb, c):
            return f"{first.label()}: ma, mb and c are not constants along the last axis"
        a = first.attrs
        return Epilogue({"kind": "add", "pre": a["pb" if mine else "pa"], "pb": a["pa" if mine else "pb"], "k": a["k"],
                         "lo": a["lo"], "hi": a["hi"], "zp": a["zero_point"], "out": a["dtype"]}, ma, c, res=other, mb=mb)
    m, c = _per_column(first.inputs[1], n, axis), _per_column(first.inputs[2], n, axis)
    if m is None or c is None:
        return f"{first.label()}: m and c are not constants along the output's column axis"
    attrs = {"kind": "requant", **_requant_attrs(first)}
    if ops == ("int.requant",):
        return Epilogue(attrs, m, c)
    _, gelu, second = chain
    if first.attrs["hi"] - first.attrs["lo"] >= MAX_TABLE:
        return f"{first.label()}: its range has {first.attrs['hi'] - first.attrs['lo'] + 1} values, too many for a table"
    m2, c2 = _per_column(second.inputs[1], n, axis), _per_column(second.inputs[2], n, axis)
    if m2 is None or c2 is None:
        return f"{second.label()}: m and c are not constants along the output's column axis"
    per_tensor = second.inputs[1].const.numel() == 1 and second.inputs[2].const.numel() == 1
    table = _gelu_table(first, gelu, second if per_tensor else None) if tables else None
    if per_tensor:
        return Epilogue(dict(attrs, kind="table", out=second.attrs["dtype"]), m, c, table)
    b = _requant_attrs(second)
    g = gelu.attrs                          # the kernel may compute shiftgelu rather than look it up
    attrs.update(kind="table_requant", out=b.pop("out"), **{k + "2": v for k, v in b.items()}, gelu_x=g["X"],
                 gelu_n=g["n"], gelu_bits=g["bits"], gelu_in_bits=g["in_bits"])
    return Epilogue(attrs, m, c, table, m2=m2, c2=c2)


def _gelu_table(first: Node, gelu: Node, second: Node | None) -> torch.Tensor:
    """shiftgelu(y + zp1) for every y in [lo1, hi1] of the first requant, then the second requant if given."""
    a, g = first.attrs, gelu.attrs
    domain = torch.arange(a["lo"], a["hi"] + 1, dtype=I32) + a["zero_point"]
    table = shiftgelu(domain, X=g["X"], n=g["n"], bits=g["bits"], in_bits=g["in_bits"])
    if second is not None:
        table = requant(table, second.inputs[1].const, second.inputs[2].const, **second.attrs)
    return table.to(I32).contiguous()


def _optional(op, name: str, *inputs):
    """``name(*inputs)`` with or without its last (optional) input."""
    return either(op(name, *inputs[:-1]), op(name, *inputs))


# ---- GEMMs: int.linear and patch int.conv2d, with their epilogues ------------------------------------
def _patch_conv_problem(conv: Node) -> str | None:
    o, cin, kh, kw = conv.inputs[1].type.shape
    _, _, h, wd = conv.inputs[0].type.shape
    if tuple(conv.attrs["stride"]) != (kh, kw) or not (isinstance(h, int) and isinstance(wd, int)) or h % kh or wd % kw:
        return f"{conv.label()}: only non-overlapping patch convolutions (stride == kernel, static size) are fused"
    return None


def _gemm_check(axis: int):
    def check(ctx, x, w, b=None, **_):
        chain = ctx.nodes[::-1]
        source = chain[0]
        if not w.is_constant:
            return ctx.fail(f"{source.label()}: the weight is not a constant")
        if b is not None and not b.is_constant:
            return ctx.fail(f"{source.label()}: the bias is not a constant")
        problem = _patch_conv_problem(source) if source.op == "int.conv2d" else None
        spec = problem or epilogue(chain, w.type.shape[0], axis, tables=False)
        return ctx.fail(spec) if isinstance(spec, str) else True
    return check


def _int_gemm(op, x: Value, weight: torch.Tensor, bias: torch.Tensor | None, x_zp: int, ep: Epilogue,
              ks: torch.Tensor | None = None) -> Value:
    """cpu.int_gemm of x ([..., K], 8-bit with zero point x_zp) by the [N, K] int8 weight, then ``ep`` (with
    ``ks``: its requant's shift per column)."""
    n, k = weight.shape
    flip = x.type.dtype == torch.int8
    a_zp = x_zp + (128 if flip else 0)
    k_padded = -(-k // 4) * 4
    packed, colsum = kernels.pack_b(F.pad(weight, (0, k_padded - k)))
    bias = (bias.to(torch.int64) if bias is not None else 0) - a_zp * colsum.to(torch.int64)
    const = lambda t, name: None if t is None else op.add_constant(t, name)  # noqa: E731
    return op("cpu.int_gemm", x, const(packed, "packed"), const(_wrap_i32(bias.expand(n)).contiguous(), "bias"),
              const(ep.m, "m"), const(ep.c, "c"), const(ep.table, "table"), ep.res, const(ep.mb, "mb"),
              const(ep.m2, "m2"), const(ep.c2, "c2"), const(ks, "ks"), **dict(ep.attrs, n=n, k_padded=k_padded, flip=flip))


def _gemm_rewrite(axis: int):
    def rewrite(op, nodes, x, w, b=None, **_):
        chain = nodes[::-1]
        source = chain[0]
        weight = w.const.reshape(w.type.shape[0], -1)
        n, k = weight.shape
        patch = source.op == "int.conv2d"
        cols = x
        if patch:  # im2col of a non-overlapping patch conv is a reshape: [B, C, H, W] -> [B, OH*OW, C*kh*kw]
            bsz, cin, h, wd = x.type.shape
            kh, kw = w.type.shape[2:]
            cols = op.reshape(x, shape=(bsz, cin, h // kh, kh, wd // kw, kw))
            cols = op.permute(cols, dims=(0, 2, 4, 1, 3, 5))
            cols = op.reshape(cols, shape=(bsz, (h // kh) * (wd // kw), cin * kh * kw))
        ep = epilogue(chain, n, axis, tables=True)
        y = _int_gemm(op, cols, weight, None if b is None else b.const, source.attrs["x_zp"], ep)
        if patch:
            y = op.reshape(op.permute(y, dims=(0, 2, 1)), shape=(bsz, n, h // kh, wd // kw))
        return y
    return rewrite


def _gemm_rules(prefix: str, source_op: str, axis: int, with_add: bool) -> list[Rule]:
    def source(op, x, w, b):
        return _optional(op, source_op, x, w, b)

    def gelu_table(op, x, w, b, m, c, m2, c2):
        return op("int.requant", op("int.shiftgelu", op("int.requant", source(op, x, w, b), m, c)), m2, c2)

    def requant_(op, x, w, b, m, c):
        return op("int.requant", source(op, x, w, b), m, c)

    def residual_add(op, x, w, b, res, ma, mb, c):
        y = source(op, x, w, b)
        return either(op("int.add", y, res, ma, mb, c), op("int.add", res, y, mb, ma, c))

    def raw(op, x, w, b):
        return source(op, x, w, b)

    check, rewrite = _gemm_check(axis), _gemm_rewrite(axis)
    patterns = [("gelu_table", gelu_table), ("requant", requant_)] + ([("add", residual_add)] if with_add else [])
    return [Rule(f"{prefix}_{name}", pattern, rewrite, check) for name, pattern in patterns + [("raw", raw)]]


# ---- sibling GEMMs: linear layers of one input with the same requant (attention's q, k, v) --------------
def _requant_linear(node: Node) -> Node | None:
    """The int.requant that is the only user of the int.linear ``node`` (constant weight, bias, m and c), or None."""
    users = node.output.users
    if len(users) != 1 or users[0].op != "int.requant" or users[0].inputs[0] is not node.output:
        return None
    rq, n = users[0], node.inputs[1].type.shape[0]
    if not all(v.is_constant for v in node.inputs[1:] if v is not None):
        return None
    return rq if _per_column(rq.inputs[1], n) is not None and _per_column(rq.inputs[2], n) is not None else None


def _siblings(linear: Node, shifts: bool) -> tuple[list[Node], str | None]:
    """The int.linear layers on linear's input (itself included, in graph order) that can share one GEMM with
    it: the same x_zp, K and requant attributes (pre, lo, hi, zero point, dtype: one per GEMM; k too unless
    ``shifts``, the shift then per column), each with its own per-column m, c. With fewer than two (or, with
    ``shifts``, all of one k: the rule without shifts takes those), why the others differ."""
    rq = _requant_linear(linear)
    if rq is None:
        return [linear], f"{linear.label()}: not a constant linear layer whose only user is a per-column requant"
    key = lambda node, r: (node.attrs["x_zp"], node.inputs[1].type.shape[1:],  # noqa: E731
                           {a: v for a, v in _requant_attrs(r).items() if not (shifts and a == "k")})
    want = key(linear, rq)
    group, differ = [], []
    for node in linear.inputs[0].users:
        if node.op != "int.linear" or node.inputs[0] is not linear.inputs[0] or any(node is g for g in group):
            continue
        other = _requant_linear(node)
        have = None if other is None else key(node, other)
        if have == want:
            group.append(node)
        elif node is not linear:
            differ.append(f"{node.label()} ({'no constant per-column requant' if have is None else _difference(want, have)})")
    if len(group) < 2:
        return group, (f"{linear.label()}: no other linear layer on %{linear.inputs[0].name} with the same requant"
                       + (": " + "; ".join(differ) if differ else ""))
    if shifts and len({_requant_linear(node).attrs["k"] for node in group}) == 1:
        return group, f"{linear.label()}: its siblings' requants are all alike (rule gemm_siblings_requant)"
    return group, None


def _difference(want: tuple, have: tuple) -> str:
    if want[:2] != have[:2]:
        return "input zero point or K differs"
    return ", ".join(f"{key} {have[2][key]} vs {want[2][key]}" for key in want[2] if have[2][key] != want[2][key])


def _siblings_check(shifts: bool):
    def check(ctx, x, w, m, c, b=None):
        _, why = _siblings(ctx.nodes[-1], shifts)
        return ctx.fail(why) if why else True
    return check


def _siblings_rewrite(shifts: bool):
    def rewrite(op, nodes, x, w, m, c, b=None):
        """One cpu.int_gemm over the concatenated weights, per-column m and c (and shifts) side by side; each
        layer's requant becomes a slice of its columns (a view: the consumers take strided operands or copy)."""
        linear = nodes[-1]
        group, _ = _siblings(linear, shifts)
        rqs = [_requant_linear(node) for node in group]
        widths = [node.inputs[1].type.shape[0] for node in group]
        cat = lambda vals: torch.cat(vals).contiguous()  # noqa: E731
        weight = cat([node.inputs[1].const.reshape(n, -1) for node, n in zip(group, widths)])
        bias = cat([node.inputs[2].const.reshape(n).to(torch.int64) if len(node.inputs) > 2 and node.inputs[2] is not None
                    else torch.zeros(n, dtype=torch.int64) for node, n in zip(group, widths)])
        m_all = cat([_per_column(rq.inputs[1], n) for rq, n in zip(rqs, widths)])
        c_all = cat([_per_column(rq.inputs[2], n) for rq, n in zip(rqs, widths)])
        ks = cat([torch.full((n,), rq.attrs["k"], dtype=I32) for rq, n in zip(rqs, widths)]) if shifts else None
        ep = Epilogue({"kind": "requant", **_requant_attrs(rqs[0])}, m_all, c_all)
        y = _int_gemm(op, x, weight, bias, linear.attrs["x_zp"], ep, ks)
        y.producer.meta["siblings"] = " + ".join(f"{node.label()} -> {rq.label()}" for node, rq in zip(group, rqs))
        graph, start, mine = linear.graph, 0, None
        for node, rq, n in zip(group, rqs, widths):
            part = op.slice(y, dim=-1, start=start, end=start + n)
            start += n
            if node is linear:
                mine = part
                continue
            graph.replace_all_uses_with(rq.output, part)
            graph.erase_node(rq)
            graph.erase_node(node)
        return mine
    return rewrite


def _linear_requant(op, x, w, b, m, c):
    return op("int.requant", _optional(op, "int.linear", x, w, b), m, c)


# Equal requants first: their GEMM is a plain cpu.int_gemm (also an ONNX Runtime custom op); then the layers
# whose requants differ only in the shift k (attention's k and v often do), with the shift per column.
SIBLINGS = Rule("gemm_siblings_requant", _linear_requant, _siblings_rewrite(False), _siblings_check(False))
SIBLING_SHIFTS = Rule("gemm_siblings_requant_shifts", _linear_requant, _siblings_rewrite(True), _siblings_check(True))


# ---- attention matmuls: int.matmul [-> int.requant [-> (add int.lookup ->) int.shiftmax]] -------------------
def _size_bias_problem(scores: Value, add: Node, sizes: Value, table: Value) -> str | None:
    """Why add(scores, int.lookup(sizes, table)) cannot be the proportional-attention term of a Shiftmax kernel."""
    if scores.type.dtype != I32 or add.output.type.dtype != I32 or scores.type.shape != add.output.type.shape:
        return f"{add.label()}: the logits are not int32 or the size term broadcasts them"
    if sizes.type.dtype != I32 or table.type.dtype != I32 or sizes.type.rank > 4:
        return f"{add.label()}: the size lookup is not int32 sizes [<= 4-D] into an int32 table"
    return None


def _chain(nodes: list[Node]) -> list[Node]:
    """The matched nodes from the producer on, without the proportional-attention term (add, int.lookup)."""
    return [n for n in nodes[::-1] if n.op not in ("add", "int.lookup")]


def _matmul_problem(node: Node, a: Value, bm: Value) -> str | None:
    """Why the int.matmul ``node`` cannot be the GEMM of a cpu.int_bmm."""
    zb = node.attrs["b_zp"]
    if a.type.rank not in (3, 4) or bm.type.rank != a.type.rank or a.type.shape[:-2] != bm.type.shape[:-2]:
        return f"{node.label()}: only 3-D/4-D matmuls with equal batch dims are fused"
    if bm.type.dtype == torch.uint8 and zb != 128 or bm.type.dtype == torch.int8 and zb != 0:
        return f"{node.label()}: the right operand ({bm.type}, zero point {zb}) is not an int8 range"
    if not isinstance(bm.type.shape[-1], int):
        return f"{node.label()}: the output width is symbolic"
    return None


def _bmm_check(ctx, a, bm, m=None, c=None, sizes=None, table=None, **_):
    chain = _chain(ctx.nodes)
    if sizes is not None:
        add = next(n for n in ctx.nodes if n.op == "add")
        problem = _size_bias_problem(chain[1].output, add, sizes, table)
        if problem:
            return ctx.fail(problem)
    problem = _matmul_problem(chain[0], a, bm)
    if problem:
        return ctx.fail(problem)
    spec = epilogue(chain[:2], bm.type.shape[-1], -1, tables=False)
    return ctx.fail(spec) if isinstance(spec, str) else True


def _bmm_rewrite(op, nodes, a, bm, m=None, c=None, mask=None, sizes=None, table=None):
    chain = _chain(nodes)
    node, n = chain[0], bm.type.shape[-1]
    ep = epilogue(chain[:2], n, -1, tables=True)
    flip_a = a.type.dtype == torch.int8
    extra, pow2 = {}, None
    if chain[-1].op == "int.shiftmax":
        s = chain[-1].attrs
        pow2 = op.add_constant(_pow2_table(s["X"], s["n"]), "pow2")
        extra = {"X": s["X"], "n_pow": s["n"], "bits": s["bits"]}
    consts = [None if t is None else op.add_constant(t, name) for name, t in (("m", ep.m), ("c", ep.c))]
    return op("cpu.int_bmm", a, bm, op.add_constant(torch.zeros(n, dtype=I32), "bias"), *consts, pow2, mask, sizes, table,
              a_zp=node.attrs["a_zp"] + (128 if flip_a else 0), flip_a=flip_a, flip_b=bm.type.dtype == torch.uint8,
              **ep.attrs, **extra)


def _bmm_softmax(op, a, bm, m, c, mask):
    scores = op("int.requant", op("int.matmul", a, bm), m, c)
    return _optional(op, "int.shiftmax", scores, mask)


def _bmm_size_bias_softmax(op, a, bm, m, c, sizes, table, mask):
    scores = op("int.requant", op("int.matmul", a, bm), m, c)
    return _optional(op, "int.shiftmax", op("add", scores, op("int.lookup", sizes, table)), mask)


def _bmm_add_size_bias_softmax(op, a, bm, ma, mb, ca, sizes, table, m, c, mask):
    scores = op("int.matmul", a, bm)
    term = either(op("reshape", op("int.lookup", sizes, table)), op("int.lookup", sizes, table))
    logits = either(op("int.add", scores, term, ma, mb, ca), op("int.add", term, scores, mb, ma, ca))
    return _optional(op, "int.shiftmax", op("int.requant", logits, m, c), mask)


def _bmm_add_parts(nodes: list[Node]) -> tuple[Node, Node, Node, Node | None]:
    """The matched int.matmul, int.add, int.requant and the reshape of the size term (None without one)."""
    by_op = {n.op: n for n in nodes}
    return by_op["int.matmul"], by_op["int.add"], by_op["int.requant"], by_op.get("reshape")


def _bmm_add_check(ctx, a, bm, ma, mb, ca, sizes, table, m, c, mask=None):
    """The size term joins the int32 accumulator by the int.add's own arithmetic, then the requant: both need
    constants per column of the scores and an int32 result in between."""
    matmul, add, rq, _ = _bmm_add_parts(ctx.nodes)
    problem = _matmul_problem(matmul, a, bm)
    if problem:
        return ctx.fail(problem)
    n = bm.type.shape[-1]
    if add.attrs["dtype"] != "i32" or add.output.type.shape != matmul.output.type.shape:
        return ctx.fail(f"{add.label()}: the size term's add is not int32 or broadcasts the scores")
    term = add.inputs[1 if add.inputs[0].producer is matmul else 0]
    if sizes.type.dtype != I32 or table.type.dtype != I32 or table.type.rank != 1 or term.type.rank > 4:
        return ctx.fail(f"{add.label()}: the size lookup is not int32 sizes [<= 4-D] into a 1-D int32 table")
    if None in (_per_column(ma, n), _per_column(mb, n), _per_column(ca, n)):
        return ctx.fail(f"{add.label()}: ma, mb and c are not constants along the last axis")
    if _per_column(m, n) is None or _per_column(c, n) is None:
        return ctx.fail(f"{rq.label()}: m and c are not constants along the last axis")
    return True


def _bmm_add_rewrite(op, nodes, a, bm, ma, mb, ca, sizes, table, m, c, mask=None):
    matmul, add, rq, reshape = _bmm_add_parts(nodes)
    n, s = bm.type.shape[-1], nodes[0].attrs
    if reshape is not None:                 # the lookup is elementwise: reshape its sizes instead of its result
        sizes = op("reshape", sizes, **reshape.attrs)
    first = add.inputs[0].producer is matmul
    a_attrs, r = add.attrs, _requant_attrs(rq)
    consts = [op.add_constant(_per_column(v, n), name) for name, v in (("m", ma), ("c", ca))]
    second = [op.add_constant(_per_column(v, n), name) for name, v in (("mb", mb), ("m2", m), ("c2", c))]
    flip_a = a.type.dtype == torch.int8
    return op("cpu.int_bmm", a, bm, op.add_constant(torch.zeros(n, dtype=I32), "bias"), *consts,
              op.add_constant(_pow2_table(s["X"], s["n"]), "pow2"), mask, sizes, table, *second,
              a_zp=matmul.attrs["a_zp"] + (128 if flip_a else 0), flip_a=flip_a, flip_b=bm.type.dtype == torch.uint8,
              X=s["X"], n_pow=s["n"], bits=s["bits"], kind="add_requant", out="i32",
              pre=a_attrs["pa" if first else "pb"], pb=a_attrs["pb" if first else "pa"], k=a_attrs["k"],
              lo=a_attrs["lo"], hi=a_attrs["hi"], zp=a_attrs["zero_point"], pre2=r["pre"], k2=r["k"], lo2=r["lo"],
              hi2=r["hi"], zp2=r["zp"])


def _bmm_requant(op, a, bm, m, c):
    return op("int.requant", op("int.matmul", a, bm), m, c)


def _bmm_raw(op, a, bm):
    return op("int.matmul", a, bm)


# ---- LayerNorm [-> requant], and the single ops -------------------------------------------------------------
def _layernorm_check(ctx, x, m=None, c=None):
    chain = ctx.nodes[::-1]
    n = x.type.shape[-1]
    if not isinstance(n, int):
        return ctx.fail(f"{chain[0].label()}: the normalized width is symbolic")
    spec = epilogue(chain, n, -1, tables=False)
    return ctx.fail(spec) if isinstance(spec, str) else True


def _layernorm_rewrite(op, nodes, x, m=None, c=None):
    chain = nodes[::-1]
    attrs = {k: chain[0].attrs[k] for k in ("C", "sh", "F", "iters")}
    ep = epilogue(chain, x.type.shape[-1], -1, tables=True)
    consts = [op.add_constant(ep.m, "m"), op.add_constant(ep.c, "c")] if len(chain) > 1 else []
    return op("cpu.int_layernorm", x, *consts, **attrs, **(ep.attrs if consts else {}))


def _layernorm_requant(op, x, m, c):
    return op("int.requant", op("int.layernorm", x), m, c)


def _layernorm(op, x):
    return op("int.layernorm", x)


def _shiftmax_check(ctx, x, mask=None, sizes=None, table=None):
    if x.type.rank > 4:
        return ctx.fail("Shiftmax over more than 4 dims")
    if sizes is not None:
        problem = _size_bias_problem(x, next(n for n in ctx.nodes if n.op == "add"), sizes, table)
        if problem:
            return ctx.fail(problem)
    return True


def _shiftmax_rewrite(op, nodes, x, mask=None, sizes=None, table=None):
    s = nodes[0].attrs
    return op("cpu.int_shiftmax", x, op.add_constant(_pow2_table(s["X"], s["n"]), "pow2"), mask, sizes, table,
              X=s["X"], n_pow=s["n"], bits=s["bits"])


def _shiftmax_size_bias(op, x, sizes, table, mask):
    return _optional(op, "int.shiftmax", op("add", x, op("int.lookup", sizes, table)), mask)


def _shiftmax(op, x, mask):
    return _optional(op, "int.shiftmax", x, mask)


def _last_axis(x: Value) -> int | None:
    n = x.type.shape[-1] if x.type.rank else None
    return n if isinstance(n, int) else None


def _requant_check(ctx, x, m, c):
    n = _last_axis(x)
    if n is None:
        return ctx.fail("the last axis is symbolic or missing")
    if _per_column(m, n) is None or _per_column(c, n) is None:
        return ctx.fail("m and c are not constants along the last axis")
    return True


LAYOUT_OPS = ("permute", "reshape", "expand")


def _layout_source(x: Value) -> tuple[Value, list[Node]]:
    """The value under a chain of layout ops ending in x, and those ops from the source up."""
    chain = []
    while x.producer is not None and x.producer.op in LAYOUT_OPS:
        chain.append(x.producer)
        x = x.producer.inputs[0]
    return x, chain[::-1]


def _requant_rewrite(op, nodes, x, m, c):
    """A requant with one m and one c commutes with layout ops: it runs on their source, which is contiguous
    where x (token merging's transposed keys: [B, H, d, T] of int32) would be copied first."""
    source, layout = _layout_source(x)
    if m.const.numel() != 1 or c.const.numel() != 1 or _last_axis(source) is None:
        source, layout = x, []
    n = _last_axis(source)
    y = op("cpu.int_requant", source, op.add_constant(_per_column(m, n), "m"),
           op.add_constant(_per_column(c, n), "c"), kind="requant", **_requant_attrs(nodes[0]))
    for node in layout:
        y = op(node.op, y, **node.attrs)
    return y


def _requant(op, x, m, c):
    return op("int.requant", x, m, c)


def _add_check(ctx, a, b, ma, mb, c):
    out = ctx.nodes[0].output
    n = _last_axis(out)
    if n is None or a.type.shape != out.type.shape:
        return ctx.fail("the first operand is broadcast or the last axis is symbolic")
    if None in (_per_column(ma, n), _per_column(mb, n), _per_column(c, n)):
        return ctx.fail("ma, mb and c are not constants along the last axis")
    return True


def _add_rewrite(op, nodes, a, b, ma, mb, c):
    at, n = nodes[0].attrs, _last_axis(nodes[0].output)
    consts = [op.add_constant(_per_column(v, n), name) for name, v in (("ma", ma), ("mb", mb), ("c", c))]
    return op("cpu.int_add", a, b, *consts, kind="add", pre=at["pa"], pb=at["pb"], k=at["k"], lo=at["lo"], hi=at["hi"],
              zp=at["zero_point"], out=at["dtype"])


def _add(op, a, b, ma, mb, c):
    return op("int.add", a, b, ma, mb, c)


# ---- integer token merging ---------------------------------------------------------------------------------
def _token_merge_check(ctx, x, keys, sizes):
    node = ctx.nodes[0]
    if keys.type.dtype not in (torch.int8, torch.uint8, I32):
        return ctx.fail(f"{node.label()}: keys {keys.type} are not 8- or 32-bit")
    if node.attrs["shift"] < 0:
        return ctx.fail(f"{node.label()}: negative key shift {node.attrs['shift']}")
    return True


def _token_merge_rewrite(op, nodes, x, keys, sizes):
    node = nodes[0]
    merged, new_sizes = op("cpu.int_token_merge", x, keys, sizes, **{a: node.attrs[a] for a in ("r", "protected", "shift")})
    node.graph.replace_all_uses_with(node.outputs[1], new_sizes)   # the rule replaces the first output only
    return merged


def _token_merge(op, x, keys, sizes):
    return op("int.token_merge", x, keys, sizes)


# ---- the float edges: int.quantize, int.dequantize ---------------------------------------------------------
def _float_column(v: Value | None, n: int) -> torch.Tensor | None:
    """A float32 constant that varies at most along the last axis, as a float32 vector of n."""
    if v is None or not v.is_constant or v.const.dtype != torch.float32:
        return None
    t = v.const
    if t.numel() == 1:
        return t.reshape(1).expand(n).contiguous()
    return t.reshape(n).contiguous() if t.dim() >= 1 and t.shape[-1] == n and t.numel() == n else None


def _quantize_rewrite(op, nodes, x):
    a = nodes[0].attrs
    return op("cpu.int_quantize", x, **{k: a[k] for k in ("inv_scale", "zero_point", "lo", "hi", "dtype")})


def _quantize(op, x):
    return op("int.quantize", x)


def _dequantize_check(ctx, x, scale, offset=None):
    node = ctx.nodes[0]
    n = _last_axis(x)
    if n is None or x.type.shape != node.output.type.shape or x.type.dtype not in (torch.uint8, torch.int8, I32):
        return ctx.fail(f"{node.label()}: the input is broadcast, has a symbolic last axis or is not 8/32-bit")
    if _float_column(scale, n) is None or offset is not None and _float_column(offset, n) is None:
        return ctx.fail(f"{node.label()}: scale and offset are not float32 constants along the last axis")
    return True


def _dequantize_rewrite(op, nodes, x, scale, offset=None):
    n = _last_axis(x)
    consts = [None if v is None else op.add_constant(_float_column(v, n), name) for name, v in (("scale", scale),
                                                                                               ("offset", offset))]
    return op("cpu.int_dequantize", x, *consts, zero_point=nodes[0].attrs["zero_point"])


def _dequantize(op, x, scale, offset):
    return _optional(op, "int.dequantize", x, scale, offset)


def kernel_node(value: Value) -> Node | None:
    """The cpu.* node behind a fusion's replacement (it may end in layout ops: a patch convolution's reshape, a
    sibling GEMM's slice)."""
    node = value.producer
    while node is not None and not node.op.startswith("cpu."):
        node = node.inputs[0].producer if node.inputs and node.inputs[0] is not None else None
    return node


RULES = [
    SIBLINGS,
    SIBLING_SHIFTS,
    *_gemm_rules("gemm", "int.linear", -1, with_add=True),
    *_gemm_rules("patch_conv", "int.conv2d", -3, with_add=False),
    Rule("bmm_add_size_bias_requant_shiftmax", _bmm_add_size_bias_softmax, _bmm_add_rewrite, _bmm_add_check),
    Rule("bmm_requant_size_bias_shiftmax", _bmm_size_bias_softmax, _bmm_rewrite, _bmm_check),
    Rule("bmm_requant_shiftmax", _bmm_softmax, _bmm_rewrite, _bmm_check),
    Rule("bmm_requant", _bmm_requant, _bmm_rewrite, _bmm_check),
    Rule("bmm_raw", _bmm_raw, _bmm_rewrite, _bmm_check),
    Rule("layernorm_requant", _layernorm_requant, _layernorm_rewrite, _layernorm_check),
    Rule("layernorm", _layernorm, _layernorm_rewrite, _layernorm_check),
    Rule("shiftmax_size_bias", _shiftmax_size_bias, _shiftmax_rewrite, _shiftmax_check),
    Rule("shiftmax", _shiftmax, _shiftmax_rewrite, _shiftmax_check),
    Rule("requant", _requant, _requant_rewrite, _requant_check),
    Rule("residual_add", _add, _add_rewrite, _add_check),
    Rule("token_merge", _token_merge, _token_merge_rewrite, _token_merge_check),
    Rule("quantize", _quantize, _quantize_rewrite),
    Rule("dequantize", _dequantize, _dequantize_rewrite, _dequantize_check),
]
for _rule in RULES:
    register_fusion(TARGET, _rule)
