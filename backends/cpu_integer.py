"""``cpu_integer`` backend: the integer graph of ``integer_only`` as fused integer CPU kernels.

Stock ONNX Runtime runs an integer-only transformer as thousands of small int32 elementwise ops
(each requantization is 4-5 passes over memory). This backend rewrites the chains into the fused
kernels of ``cpu_integer_ops`` (AMX / AVX512-VNNI GEMMs with the requantization, ShiftGELU table or
residual add in the epilogue; attention scores straight into Shiftmax; LayerNorm with its requant)
and runs the result with the torch backend, so layout ops and anything not fused keep their
reference implementations. Every kernel computes the reference's integers (tests compare bit for bit):

    int.linear -> int.requant [-> int.shiftgelu -> int.requant]   => cpu.int_gemm(kind=requant|table|table_requant)
    int.linear -> int.add(., residual)                              => cpu.int_gemm(kind=add)
    int.conv2d (stride == kernel, no padding) [-> int.requant]      => im2col reshape + cpu.int_gemm
    int.matmul -> int.requant [-> int.shiftmax]                     => cpu.int_bmm
    int.layernorm [-> int.requant]                                  => cpu.int_layernorm
    int.shiftmax (with or without a mask)                           => cpu.int_shiftmax
    int.requant (m, c constant along the last axis)                 => cpu.int_requant
    int.add (ma, mb, c constant along the last axis)                => cpu.int_add

``report`` lists what became which kernel and what stayed on the reference ops, with the reason.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

import graphopt.backends.cpu_integer_ops  # noqa: F401  (registers the cpu.* ops)
from graphopt.backends import LoweringError
from graphopt.backends import cpu_integer_library as kernels
from graphopt.backends.registry import register_backend
from graphopt.backends.torch_backend import TorchExecutable
from graphopt.ir import Graph, Node, Value
from graphopt.ir.ops.integer import requant, shift_pow2, shiftgelu
from graphopt.ir.verifier import verify

I32 = torch.int32
MAX_TABLE = 1 << 20                 # entries of a requant(shiftgelu(.)) table folded into a GEMM epilogue


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


def _constant_bias(node: Node) -> tuple[torch.Tensor | None, str | None]:
    """(bias tensor or None, reason it cannot be fused or None) of an int.linear / int.conv2d."""
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if b is not None and not b.is_constant:
        return None, "the bias is not a constant"
    return (b.const if b is not None else None), None


@dataclass
class _Chain:
    """What a GEMM writing one value can finish in its epilogue: the nodes it absorbs, the value it then
    produces, the kernel attributes and the per-column constants / residual operand of the epilogue."""
    result: Value
    nodes: list[Node] = field(default_factory=list)
    attrs: dict = field(default_factory=lambda: {"kind": "raw", "out": "i32"})
    m: torch.Tensor | None = None
    c: torch.Tensor | None = None
    table: torch.Tensor | None = None
    res: Value | None = None
    mb: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    c2: torch.Tensor | None = None


def _requant_attrs(node: Node) -> dict:
    a = node.attrs
    return {"pre": a["pre"], "k": a["k"], "lo": a["lo"], "hi": a["hi"], "zp": a["zero_point"], "out": a["dtype"]}


def _gelu_table(first: Node, gelu: Node, second: Node | None) -> torch.Tensor:
    """shiftgelu(y + zp1) for every y in [lo1, hi1] of the first requant, then the second requant if given."""
    a, g = first.attrs, gelu.attrs
    domain = torch.arange(a["lo"], a["hi"] + 1, dtype=I32) + a["zero_point"]
    table = shiftgelu(domain, X=g["X"], n=g["n"], bits=g["bits"], in_bits=g["in_bits"])
    if second is not None:
        table = requant(table, second.inputs[1].const, second.inputs[2].const, **second.attrs)
    return table.to(I32).contiguous()


class Lowered(NamedTuple):
    """One report entry: ``kernel`` is the cpu.* op made (or "reference"), ``nodes`` what it replaced (or why not)."""
    kernel: str
    nodes: str


class KernelReport(list):
    """What became which kernel and what stayed on the reference ops; prints as a short summary."""

    def __str__(self) -> str:
        made = Counter(e.kernel for e in self if e.kernel != "reference")
        kept = [e.nodes for e in self if e.kernel == "reference"]
        lines = [f"cpu_integer: {sum(made.values())} kernel(s)" + (": " + ", ".join(f"{k} x{n}" for k, n in sorted(made.items())) if made else "")]
        lines += [f"left on the reference ops: {len(kept)}"] + [f"  {why}" for why in kept] if kept else []
        return "\n".join(lines)


class _Lowering:
    def __init__(self, graph: Graph, threads: int):
        self.graph, self.threads = graph, threads
        self.report = KernelReport()
        self._erased: set[int] = set()

    def const(self, tensor: torch.Tensor, name: str) -> Value:
        return self.graph.add_constant(tensor, name)

    def replace(self, old_nodes: list[Node], result: Value, new: Value) -> None:
        self.graph.replace_all_uses_with(result, new)
        for node in reversed(old_nodes):
            self.graph.erase_node(node)
            self._erased.add(id(node))
        self.report.append(Lowered(new.producer.op, " -> ".join(n.label() for n in old_nodes)))

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if id(node) in self._erased:
                continue
            handler = getattr(self, "lower_" + node.op.replace("int.", ""), None) if node.op.startswith("int.") else None
            if handler is not None:
                reason = handler(node)
                if reason:
                    self.report.append(Lowered("reference", f"{node.label()}: {reason}"))
        self.graph.remove_unused_constants()

    # ---- epilogues ------------------------------------------------------------------------------
    def epilogue(self, value: Value, n: int, axis: int = -1) -> _Chain:
        """The chain of ops after ``value`` that the GEMM writing it can finish in its epilogue."""
        user = value.sole_user
        if user is not None and user.op == "int.requant" and user.inputs[0] is value:
            m, c = _per_column(user.inputs[1], n, axis), _per_column(user.inputs[2], n, axis)
            if m is not None and c is not None:
                attrs = {"kind": "requant", **_requant_attrs(user)}
                gelu = user.output.sole_user
                second = gelu.output.sole_user if gelu is not None and gelu.op == "int.shiftgelu" else None
                if second is not None and second.op == "int.requant" and user.attrs["hi"] - user.attrs["lo"] < MAX_TABLE:
                    m2, c2 = _per_column(second.inputs[1], n, axis), _per_column(second.inputs[2], n, axis)
                    if m2 is not None and c2 is not None:
                        chain = [user, gelu, second]
                        if second.inputs[1].const.numel() == 1 and second.inputs[2].const.numel() == 1:
                            attrs.update(kind="table", out=second.attrs["dtype"])
                            return _Chain(second.output, chain, attrs, m, c, _gelu_table(user, gelu, second))
                        b = _requant_attrs(second)
                        attrs.update(kind="table_requant", out=b.pop("out"), **{k + "2": v for k, v in b.items()})
                        return _Chain(second.output, chain, attrs, m, c, _gelu_table(user, gelu, None), m2=m2, c2=c2)
                return _Chain(user.output, [user], attrs, m, c)
        if user is not None and user.op == "int.add" and axis == -1:
            mine = 0 if user.inputs[0] is value else 1
            other = user.inputs[1 - mine]
            ma, mb = _per_column(user.inputs[2 + mine], n), _per_column(user.inputs[3 - mine], n)
            c = _per_column(user.inputs[4], n)
            if other is not value and other.type.shape == value.type.shape and None not in (ma, mb, c):
                a = user.attrs
                attrs = {"kind": "add", "pre": a["pb" if mine else "pa"], "pb": a["pa" if mine else "pb"], "k": a["k"],
                         "lo": a["lo"], "hi": a["hi"], "zp": a["zero_point"], "out": a["dtype"]}
                return _Chain(user.output, [user], attrs, ma, c, res=other, mb=mb)
        return _Chain(value)

    def consts(self, **tensors) -> list[Value | None]:
        return [None if t is None else self.const(t, name) for name, t in tensors.items()]

    def gemm(self, nodes: list[Node], x: Value, a_zp: int, weight: torch.Tensor, bias: torch.Tensor | None,
             axis: int = -1):
        n, k = weight.shape
        flip = x.type.dtype == torch.int8
        a_zp += 128 if flip else 0
        k_padded = -(-k // 4) * 4
        packed, colsum = kernels.pack_b(F.pad(weight, (0, k_padded - k)))
        b = (bias.to(torch.int64) if bias is not None else 0) - a_zp * colsum.to(torch.int64)
        ch = self.epilogue(nodes[-1].output, n, axis)
        inputs = [x, self.const(packed, "packed"), self.const(_wrap_i32(b.expand(n)).contiguous(), "bias")]
        inputs += self.consts(m=ch.m, c=ch.c, table=ch.table) + [ch.res] + self.consts(mb=ch.mb, m2=ch.m2, c2=ch.c2)
        return nodes + ch.nodes, ch.result, inputs, dict(ch.attrs, n=n, k_padded=k_padded, flip=flip,
                                                           threads=self.threads)

    # ---- ops ------------------------------------------------------------------------------------
    def lower_linear(self, node: Node):
        x, w = node.inputs[0], node.inputs[1]
        bias, reason = _constant_bias(node)
        if not w.is_constant or reason:
            return reason or "the weight is not a constant"
        nodes, result, inputs, attrs = self.gemm([node], x, node.attrs["x_zp"], w.const, bias)
        with self.graph.inserting_before(nodes[-1]):
            self.replace(nodes, result, self.graph.call("cpu.int_gemm", *inputs, **attrs))

    def lower_conv2d(self, node: Node):
        x, w = node.inputs[0], node.inputs[1]
        o, cin, kh, kw = w.type.shape
        bsz, _, h, wd = x.type.shape
        if tuple(node.attrs["stride"]) != (kh, kw) or not (isinstance(h, int) and isinstance(wd, int)) \
                or h % kh or wd % kw or not w.is_constant:
            return "only non-overlapping patch convolutions (stride == kernel) with constant weights are fused"
        bias, reason = _constant_bias(node)
        if reason:
            return reason
        oh, ow = h // kh, wd // kw
        with self.graph.inserting_before(node):
            cols = self.graph.call("reshape", x, shape=(bsz, cin, oh, kh, ow, kw))
            cols = self.graph.call("permute", cols, dims=(0, 2, 4, 1, 3, 5))
            cols = self.graph.call("reshape", cols, shape=(bsz, oh * ow, cin * kh * kw))
        nodes, result, inputs, attrs = self.gemm([node], cols, node.attrs["x_zp"], w.const.reshape(o, -1), bias, axis=-3)
        inputs[0] = cols
        with self.graph.inserting_before(nodes[-1]):
            y = self.graph.call("cpu.int_gemm", *inputs, **attrs)
            y = self.graph.call("permute", y, dims=(0, 2, 1))
            self.replace(nodes, result, self.graph.call("reshape", y, shape=(bsz, o, oh, ow)))

    def lower_matmul(self, node: Node):
        a, b = node.inputs
        za, zb = node.attrs["a_zp"], node.attrs["b_zp"]
        if a.type.rank not in (3, 4) or b.type.rank != a.type.rank or a.type.shape[:-2] != b.type.shape[:-2]:
            return "only 3-D/4-D matmuls with equal batch dims are fused"
        if b.type.dtype == torch.uint8 and zb != 128 or b.type.dtype == torch.int8 and zb != 0:
            return f"the right operand ({b.type}, zero point {zb}) is not an int8 range"
        n = b.type.shape[-1]
        if not isinstance(n, int):
            return "the output width is symbolic"
        flip_a = a.type.dtype == torch.int8
        ch = self.epilogue(node.output, n)
        if ch.attrs["kind"] not in ("raw", "requant"):
            ch = _Chain(node.output)
        chain, result, attrs = ch.nodes, ch.result, ch.attrs
        pow2, mask, extra = None, None, {}
        softmax = result.sole_user if chain else None
        if softmax is not None and softmax.op == "int.shiftmax" and softmax.inputs[0] is result:
            s = softmax.attrs
            pow2 = self.const(self.pow2_table(s["X"], s["n"]), "pow2")
            extra = {"X": s["X"], "n_pow": s["n"], "bits": s["bits"]}
            chain, result = chain + [softmax], softmax.output
            mask = softmax.inputs[1] if len(softmax.inputs) > 1 else None
        inputs = [a, b, self.const(torch.zeros(n, dtype=I32), "bias")]
        inputs += self.consts(m=ch.m, c=ch.c) + [pow2, mask]
        with self.graph.inserting_before(chain[-1] if chain else node):
            y = self.graph.call("cpu.int_bmm", *inputs, a_zp=za + (128 if flip_a else 0), flip_a=flip_a,
                                flip_b=b.type.dtype == torch.uint8, threads=self.threads, **attrs, **extra)
            self.replace([node] + chain, result, y)

    def lower_layernorm(self, node: Node):
        n = node.inputs[0].type.shape[-1]
        if not isinstance(n, int):
            return "the normalized width is symbolic"
        user = node.output.sole_user
        a = {k: node.attrs[k] for k in ("C", "sh", "F", "iters")}
        chain, m, c = [], None, None
        if user is not None and user.op == "int.requant":
            m, c = _per_column(user.inputs[1], n), _per_column(user.inputs[2], n)
            if m is not None and c is not None:
                chain = [user]
                a.update(kind="requant", **_requant_attrs(user))
        result = chain[-1].output if chain else node.output
        mc = [self.const(m, "m"), self.const(c, "c")] if chain else []
        with self.graph.inserting_before(chain[-1] if chain else node):
            self.replace([node] + chain, result, self.graph.call("cpu.int_layernorm", node.inputs[0], *mc,
                                                                 threads=self.threads, **a))

    def lower_shiftmax(self, node: Node):
        if node.inputs[0].type.rank > 4:
            return "Shiftmax over more than 4 dims"
        s = node.attrs
        pow2 = self.const(self.pow2_table(s["X"], s["n"]), "pow2")
        mask = node.inputs[1] if len(node.inputs) > 1 else None
        with self.graph.inserting_before(node):
            self.replace([node], node.output, self.graph.call("cpu.int_shiftmax", node.inputs[0], pow2, mask,
                                                              X=s["X"], n_pow=s["n"], bits=s["bits"],
                                                              threads=self.threads))

    def lower_requant(self, node: Node):
        n = node.inputs[0].type.shape[-1] if node.inputs[0].type.rank else None
        if not isinstance(n, int):
            return "the last axis is symbolic or missing"
        m, c = _per_column(node.inputs[1], n), _per_column(node.inputs[2], n)
        if m is None or c is None:
            return "m and c are not constants along the last axis"
        with self.graph.inserting_before(node):
            y = self.graph.call("cpu.int_requant", node.inputs[0], self.const(m, "m"), self.const(c, "c"),
                                kind="requant", threads=self.threads, **_requant_attrs(node))
            self.replace([node], node.output, y)

    def lower_add(self, node: Node):
        a, b = node.inputs[:2]
        n = node.output.type.shape[-1] if node.output.type.rank else None
        if not isinstance(n, int) or a.type.shape != node.output.type.shape:
            return "the first operand is broadcast or the last axis is symbolic"
        ma, mb, c = (_per_column(v, n) for v in node.inputs[2:])
        if ma is None or mb is None or c is None:
            return "ma, mb and c are not constants along the last axis"
        at = node.attrs
        with self.graph.inserting_before(node):
            y = self.graph.call("cpu.int_add", a, b, self.const(ma, "ma"), self.const(mb, "mb"), self.const(c, "c"),
                                kind="add", pre=at["pa"], pb=at["pb"], k=at["k"], lo=at["lo"], hi=at["hi"],
                                zp=at["zero_point"], out=at["dtype"], threads=self.threads)
            self.replace([node], node.output, y)

    @staticmethod
    def pow2_table(X: int, n: int) -> torch.Tensor:
        return shift_pow2(torch.arange(0, n * X + 1, dtype=I32), X, n).to(I32).contiguous()


def lower_to_kernels(graph: Graph, threads: int | None = None) -> tuple[Graph, KernelReport]:
    """A copy of ``graph`` with its integer chains replaced by cpu.* kernel ops, and the report.
    A graph without integer ops is refused: running it here would silently be the float model."""
    if not any(n.op.startswith("int.") for n in graph.nodes):
        raise LoweringError(f"backend 'cpu_integer': graph {graph.name!r} has no integer ops, so nothing would be "
                            "lowered to the integer kernels; run the 'integer_only' pass first (it needs calibration "
                            "data), or use backend='torch' for a float graph")
    lowering = _Lowering(graph.clone(), threads or torch.get_num_threads())
    lowering.run()
    verify(lowering.graph)
    return lowering.graph, lowering.report


class CpuIntegerExecutable(TorchExecutable):
    """Called like the source model; ``.report`` says which nodes became which kernel."""

    def __init__(self, graph: Graph, *, threads: int | None = None):
        lowered, self.report = lower_to_kernels(graph, threads)  # a float graph is refused before any build
        kernels.library()                    # build the kernels now: a missing compiler fails here
        super().__init__(lowered)


@register_backend("cpu_integer")
def _cpu_integer(graph: Graph, *, threads: int | None = None):
    return CpuIntegerExecutable(graph, threads=threads).eval()
