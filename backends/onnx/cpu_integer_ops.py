"""The ``cpu_integer`` kernels as ONNX Runtime custom ops: an integer graph written as ONNX with the
fused ``cpu.*`` ops that backend runs, each one node of domain ``ai.graphopt.cpu_integer``, run by the
custom-op library ``backends/ort_custom_ops.c`` (same C kernels, so bit-identical outputs).

    to_onnx_custom_ops(graph, threads=0)   # an integer graph (integer_only) -> ModelProto

This is opt-in: the portable ONNX of an integer graph (``to_onnx``) writes its ``int.*`` ops as standard
ai.onnx ops and runs in any ONNX Runtime. Here the graph goes through ``cpu_integer``'s fusions first;
what they leave (layout ops, integer ops no fusion takes) stays standard. A fusion making a ``cpu.*`` kernel
the library has no custom op for (one added to cpu_integer later) is skipped, so its chain keeps the standard
lowering. The lowerings are kernels of their own target (``TARGET``), so the default ONNX emitter never writes a
custom op; given a ``cpu.*`` node without a custom op, this emitter names the node and the op.

A node is op type ``<Op>_<output dtype>`` (ONNX Runtime takes a custom op's output type from its
registration), the ``cpu.*`` node's inputs, outputs and attributes (bools as ints; ``out`` and ``dtype`` are in
the op type).
IntGemm's weight is written unpacked, [N, K padded] int8, and packed by the library at the first run,
so the file does not depend on the kernels' packed layout.
"""
from __future__ import annotations

import onnx
import torch

from graphopt.backends import LoweringError
from graphopt.backends import cpu_integer_library as kernels
from graphopt.backends.cpu_integer_fusions import kernel_node
from graphopt.backends.cpu_integer_layout import fold_attention_outputs, fold_key_head_sums, fold_patchify
from graphopt.backends.cpu_integer_rows import mark_live_rows
from graphopt.backends.kernels import fusion_rules, register_kernel, select
from graphopt.backends.onnx.emitter import Emitter
from graphopt.ir import Graph, Node, Value
from graphopt.ir.onnx_common import onnx_dtype, tensor_to_proto
from graphopt.ir.ops.integer import INT_DTYPES
from graphopt.ir.rewrite import Rule, RuleSet
from graphopt.ir.verifier import verify

TARGET = "onnx_ort_custom_ops"
DOMAIN = "ai.graphopt.cpu_integer"
OP_TYPES = {"cpu.int_gemm": "IntGemm", "cpu.int_bmm": "IntBmm", "cpu.int_layernorm": "IntLayerNorm",
            "cpu.int_shiftmax": "IntShiftmax", "cpu.int_requant": "IntRequant", "cpu.int_add": "IntAdd",
            "cpu.int_token_merge": "IntTokenMerge", "cpu.int_quantize": "IntQuantize",
            "cpu.int_dequantize": "IntDequantize"}
_DTYPE_NAMES = {**{dtype: name for name, dtype in INT_DTYPES.items()}, torch.float32: "f32"}


def to_onnx_custom_ops(graph: Graph, *, threads: int = 0, opset: int | None = None) -> onnx.ModelProto:
    """``graph`` (with int.* ops) lowered to cpu_integer's kernels and written with them as custom ops.
    ``threads``: the kernels' thread count, written into each node; 0 leaves it to the library (its
    ``go_ort_set_threads``, else the CPUs the process may run on)."""
    import graphopt.backends.cpu_integer  # noqa: F401  (registers cpu_integer's fusion rules)

    lowered = kernel_graph(graph, fusion_rules("cpu_integer").rules)
    for node in lowered.nodes:
        if node.op.startswith("cpu."):
            node.attrs["threads"] = int(threads)
    fold_attention_outputs(lowered)
    fold_key_head_sums(lowered)          # IntTokenMerge sums the per-head keys itself, as on cpu_integer
    fold_patchify(lowered)               # IntQuantize writes a ViT's patches (no 6-D Transpose of the image)
    if mark_live_rows(lowered):          # after zero_padded_positions: only the real tokens, as on cpu_integer
        verify(lowered)
    return _without_unused_nodes(CustomOpsEmitter(lowered, opset).build())


def _without_unused_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """model less the nodes nothing reads (the Transposes an IntBmm now reads through its a_perm / b_perm)."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return model                     # a subgraph may read outer values by name: keep everything
    read = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in read for o in node.output if o):
            kept.append(node)
            read.update(node.input)
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(reversed(kept))
    return model


def kernel_graph(graph: Graph, rules: list[Rule]) -> Graph:
    """A copy of ``graph`` with the fusion ``rules`` applied, except those that make a kernel op with no custom
    op here: those rules are dropped and the fusions redone, so their chains stay int.* ops."""
    if not any(n.op.startswith("int.") for n in graph.nodes):
        raise LoweringError(f"graph {graph.name!r} has no integer ops: the ONNX Runtime custom ops are graphopt's "
                            "integer kernels; run the 'integer_only' pass first (it needs calibration data)")
    while True:
        lowered, made = graph.clone(), []
        RuleSet("cpu_integer fusions", rules).apply(lowered, on_fire=lambda rule, nodes, new: made.append((rule, new)))
        dropped = {rule.name for rule, new in made if not _has_custom_op(kernel_node(new))}
        if not dropped:
            break
        rules = [rule for rule in rules if rule.name not in dropped]
    lowered.remove_unused_constants()
    verify(lowered)
    return lowered


def _has_custom_op(node: Node | None) -> bool:
    return node is None or (node.op in OP_TYPES and select(TARGET, node)[0] is not None)


class CustomOpsEmitter(Emitter):
    """The ONNX emitter with the ``cpu.*`` ops written as custom ops of ``DOMAIN``."""

    def __init__(self, graph: Graph, opset: int | None):
        super().__init__(graph, opset)
        self.opsets[DOMAIN] = 1

    def _lower(self, node: Node) -> list[str]:
        if not node.op.startswith("cpu."):
            return super()._lower(node)
        kernel, reasons = select(TARGET, node)
        if kernel is None:
            raise LoweringError(f"node {node.label()} is cpu_integer kernel {node.op!r}, which has no ONNX Runtime "
                                "custom op in backends/ort_custom_ops.c ({}); write the portable standard-op ONNX "
                                "instead (opt-cli without --ort-custom-ops)".format("; ".join(reasons)))
        return kernel.fn(self, node)


def _attributes(node: Node) -> dict:
    """The node's attributes as ONNX ones (an empty list, such as no out_perm, is left out: it has no type;
    heads_axis is the token merge's to write, as it may read its keys' source)."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in node.attrs.items()
            if k not in ("out", "dtype", "heads_axis") and v != ()}


def _custom_node(em: Emitter, node: Node, inputs: list[str], **extra) -> list[str]:
    while inputs and not inputs[-1]:
        inputs.pop()
    op_type = f"{OP_TYPES[node.op]}_{_DTYPE_NAMES[node.outputs[0].type.dtype]}"
    return em.node(op_type, inputs, [em.out(node, i) for i in range(len(node.outputs))], domain=DOMAIN,
                   name=node.outputs[0].name, **_attributes(node), **extra)


def _lower_plain(em: Emitter, node: Node) -> list[str]:
    return _custom_node(em, node, [em.input(node, i) for i in range(len(node.inputs))])


def _lower_bmm(em: Emitter, node: Node) -> list[str]:
    """IntBmm reads a permuted operand in place (a_perm, b_perm), as cpu_integer reads the permuted view: the
    attention's Transposes of Q, K and V are not copied (ONNX Runtime materializes each one)."""
    inputs = [em.input(node, i) for i in range(len(node.inputs))]
    perms = {}
    for i, name in ((0, "a_perm"), (1, "b_perm")):
        source, perm = _permuted_source(node.inputs[i])
        if perm is not None and not node.attrs["flip_a"] and (i == 1 or perm[-1] == 3):
            inputs[i], perms[name] = em.value(source), perm
    return _custom_node(em, node, inputs, **perms)


def _permuted_source(v: Value) -> tuple[Value, list[int] | None]:
    """(x, perm) with v = transpose(x, perm) through a chain of 4-D permutes, or (v, None)."""
    perm = [0, 1, 2, 3]
    while v.type.rank == 4 and v.producer is not None and v.producer.op == "permute":
        dims = [d % 4 for d in v.producer.attrs["dims"]]
        perm = [dims[p] for p in perm]
        v = v.producer.inputs[0]
    return (v, perm) if perm != [0, 1, 2, 3] else (v, None)


def _lower_gemm(em: Emitter, node: Node) -> list[str]:
    inputs = [_unpacked_weight(em, node) if i == 1 else em.input(node, i) for i in range(len(node.inputs))]
    return _custom_node(em, node, inputs)


def _unpacked_weight(em: Emitter, node: Node) -> str:
    packed = node.inputs[1]
    if not packed.is_constant:
        raise LoweringError(f"node {node.label()} (cpu.int_gemm): its packed weight is not a constant")
    key = ("unpacked", id(packed))
    if key not in em.cache:
        weight = unpack_b(packed.const, node.attrs["n"], node.attrs["k_padded"])
        name = em.fresh(f"{packed.name}_weight")
        em.initializers.append(tensor_to_proto(weight, name))
        em.cache[key] = name
    return em.cache[key]


def unpack_b(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [n, k] int8 matrix that ``cpu_integer_library.pack_b`` packed into ``packed``, whatever the packed
    layout: pack_b only moves bytes (padding is zero), so packing each element's position code (base-127
    digits of its index, plus 1 so that no code is 0) says where every element went."""
    count = n * k
    digits = 1
    while 127 ** digits < count:
        digits += 1
    index = torch.arange(count, dtype=torch.int64)
    where = torch.zeros(packed.numel(), dtype=torch.int64)
    filled = None
    for d in range(digits):
        code = kernels.pack_b((index // 127 ** d % 127 + 1).to(torch.int8).reshape(n, k))[0].to(torch.int64)
        if code.numel() != packed.numel():
            raise LoweringError(f"a packed [{n}, {k}] weight has {packed.numel()} bytes, pack_b makes {code.numel()}")
        filled = code != 0 if filled is None else filled
        where += (code - 1).clamp(min=0) * 127 ** d
    source = where[filled]
    if source.numel() != count or not torch.equal(source.sort().values, index):
        raise LoweringError("cpu_integer_library.pack_b does more than move bytes, so a packed weight cannot be "
                            "unpacked for the ONNX Runtime custom ops")
    weight = torch.empty(count, dtype=torch.int8)
    weight[source] = packed.reshape(-1)[filled]
    return weight.reshape(n, k)


def _lower_token_merge(em: Emitter, node: Node) -> list[str]:
    """IntTokenMerge sums per-head keys itself (heads_axis): [B, H, N, d] keys that are the transpose (0, 2, 1, 3)
    of [B, N, H, d] are read there (heads_axis 2), as cpu_integer reads the permuted view, rather than through
    a Transpose ONNX Runtime would copy (DeiT-S b8 with token merging: the per-head ReduceSum and its Transposes
    had cost 4.9 ms a forward)."""
    inputs = [em.input(node, i) for i in range(len(node.inputs))]
    axis = node.attrs["heads_axis"]
    source, perm = _permuted_source(node.inputs[1])
    if axis and perm == [0, 2, 1, 3]:
        inputs[1], axis = em.value(source), perm[axis]
    return _custom_node(em, node, inputs, heads_axis=axis)


for _op in OP_TYPES:
    register_kernel(TARGET, _op, name=f"custom_op_{OP_TYPES[_op]}")(
        {"cpu.int_gemm": _lower_gemm, "cpu.int_bmm": _lower_bmm,
         "cpu.int_token_merge": _lower_token_merge}.get(_op, _lower_plain))


def _lower_live_rows(em: Emitter, node: Node) -> list[str]:
    """cpu.live_rows in standard ops: keep as uint8 where every mask keeps exactly the real keys of the real
    query rows (Equal / Or / ReduceMin), else ones."""
    keep = em.input(node, 0)
    key = em.one("Unsqueeze", [keep, em.literal([1, 2])])
    padded_row = em.one("Not", [em.one("Unsqueeze", [keep, em.literal([1, 3])])])
    live = em.one("Cast", [keep], to=onnx_dtype(torch.uint8))
    agree = None
    for i in range(1, len(node.inputs)):
        mask, rank = em.input(node, i), node.inputs[i].type.rank
        if rank < 4:
            mask = em.one("Unsqueeze", [mask, em.literal(list(range(4 - rank)))])
        ok = em.one("Or", [em.one("Equal", [mask, key]), padded_row])
        ok = em.one("ReduceMin", [em.one("Cast", [ok], to=onnx_dtype(torch.int32))], keepdims=0)
        agree = ok if agree is None else em.one("Min", [agree, ok])
    if agree is None:
        return em.node("Identity", [live], [em.out(node)])
    ones = em.one("Expand", [em.literal(1, torch.uint8), em.one("Shape", [keep])])
    return em.node("Where", [em.one("Cast", [agree], to=onnx_dtype(torch.bool)), live, ones], [em.out(node)])


register_kernel(TARGET, "cpu.live_rows", name="standard_ops_live_rows")(_lower_live_rows)
