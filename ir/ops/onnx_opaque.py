"""ONNX-opaque ops: an ONNX node the IR has no op for (any domain: ``com.microsoft`` fused ops,
``Shape``, ``TopK``, control flow, model-local functions).

The node keeps its domain, op type, attributes (as serialized ``AttributeProto`` bytes, so they
round-trip bit for bit), the opset versions it was read with, and its output types. The ONNX
Runtime backend writes it back verbatim. Its reference implementation runs the node alone in a
one-node ONNX Runtime session, so passes' numerical checks and the torch backend work on graphs
read from ONNX too.

Attributes of the IR op:
  domain, op_type   the ONNX op
  attributes        OnnxAttributes: the node's attributes, exactly
  opsets            ((domain, version), ...): the opset imports the node needs
  out_types         IR types of its outputs
  skip_outputs      positions of ONNX outputs left empty ("") between present ones
  captures          outer-scope value names its subgraphs (If/Loop/Scan bodies) read; the
                    matching IR inputs follow the node's own inputs
  functions         serialized model-local FunctionProtos the node calls
"""
from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from typing import Iterable

import torch

from graphopt.ir.opdef import Attr, OpError, register_op

OP = "onnx_opaque"


class OnnxAttributes:
    """An ONNX node's attributes, kept as serialized ``AttributeProto`` bytes in their original order."""
    __slots__ = ("blobs",)

    def __init__(self, attributes: Iterable = ()):
        blobs = []
        for a in attributes:
            blobs.append(a if isinstance(a, bytes) else a.SerializeToString(deterministic=True))
        self.blobs = tuple(blobs)

    def protos(self) -> list:
        import onnx

        return [onnx.AttributeProto.FromString(b) for b in self.blobs]

    def names(self) -> list[str]:
        return [p.name for p in self.protos()]

    def get(self, name: str, default=None):
        import onnx

        for p in self.protos():
            if p.name == name:
                value = onnx.helper.get_attribute_value(p)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def __eq__(self, other):
        return isinstance(other, OnnxAttributes) and other.blobs == self.blobs

    def __hash__(self):
        return hash(self.blobs)

    def __len__(self):
        return len(self.blobs)

    def __getstate__(self):
        return self.blobs

    def __setstate__(self, state):
        self.blobs = state

    def __repr__(self) -> str:
        import onnx

        parts = []
        for blob, p in zip(self.blobs, self.protos()):
            # tensors and graphs print as a digest of their bytes: distinct ones never print the same
            digest = hashlib.sha1(blob).hexdigest()[:12]
            if p.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                parts.append(f"{p.name}=<graph {digest}>")
            elif p.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.TENSORS,
                            onnx.AttributeProto.SPARSE_TENSORS, onnx.AttributeProto.TYPE_PROTO,
                            onnx.AttributeProto.TYPE_PROTOS):
                parts.append(f"{p.name}=<{onnx.AttributeProto.AttributeType.Name(p.type).lower()} {digest}>")
            else:
                value = onnx.helper.get_attribute_value(p)
                if isinstance(value, bytes):
                    value = value.decode(errors="replace")
                elif isinstance(value, list):
                    value = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
                parts.append(f"{p.name}={value!r}")
        return "{" + ",".join(parts) + "}"


# ONNX ops whose results are random: never merged, folded or assumed equal
RANDOM_OPS = {("", "RandomNormal"), ("", "RandomUniform"), ("", "RandomNormalLike"), ("", "RandomUniformLike"),
              ("", "Multinomial"), ("", "Bernoulli"), ("", "Dropout")}


def is_pure_onnx(node) -> bool:
    """An ONNX op is free of side effects; only the random ones are not deterministic."""
    a = node.attrs
    if (a["domain"], a["op_type"]) in RANDOM_OPS:
        return False
    return not a["domain"].startswith("ai.onnx.preview.training") and a["domain"] != "ai.onnx.training"


def _infer(*inputs, out_types, **attrs):
    return out_types


@register_op(OP, inputs=["*inputs"],
             attrs={"domain": Attr("str", "", "ONNX domain; '' is ai.onnx"),
                    "op_type": Attr("str"),
                    "attributes": Attr("any", None, "OnnxAttributes"),
                    "opsets": Attr("any", (), "((domain, version), ...) the node needs"),
                    "out_types": Attr("types"),
                    "skip_outputs": Attr("ints", (), "ONNX output positions left empty"),
                    "captures": Attr("any", (), "outer-scope names read by subgraphs; extra trailing inputs"),
                    "functions": Attr("any", (), "serialized model-local FunctionProtos the node calls")},
             infer=_infer)
def onnx_opaque(*inputs, domain, op_type, attributes, opsets, out_types, skip_outputs, captures, functions):
    """Runs the ONNX node alone in ONNX Runtime (the reference for ops the IR does not know)."""
    shaped = _has_body(domain, op_type, attributes, opsets, functions)
    signature = tuple((t.dtype, tuple(t.shape) if shaped else None) if t is not None else None for t in inputs)
    session, input_names = _session(domain, op_type, attributes, opsets, out_types, skip_outputs, captures,
                                    functions, signature)
    from graphopt.ir.onnx_common import to_numpy

    feeds = {name: to_numpy(t) for name, t in zip(input_names, inputs) if name}
    results = session.run(None, feeds)
    outs = tuple(torch.from_numpy(r) if hasattr(r, "dtype") else torch.as_tensor(r) for r in results)
    return outs[0] if len(outs) == 1 else outs


_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_LOCK = threading.Lock()
_CACHE_SIZE = 512


def _session(domain, op_type, attributes, opsets, out_types, skip_outputs, captures, functions, signature):
    key = (domain, op_type, attributes, opsets, out_types, skip_outputs, captures, functions, signature)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    built = _build_session(*key)
    with _LOCK:
        _CACHE[key] = built
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return built


def _build_session(domain, op_type, attributes, opsets, out_types, skip_outputs, captures, functions, signature):
    """``signature``: (dtype, shape or None) of each input. Shapes are given only for nodes with
    subgraphs or function bodies: ONNX Runtime needs them to type a subgraph's outputs (a Scan in
    LinearAttention's body, Loop, If) and to build a context-dependent function body
    (CausalConvWithState), while some other ops' inference misreads an unknown dim (Resize takes an
    unsized ``sizes`` for an empty one), and their sessions are best shared across shapes."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from graphopt.ir.onnx_common import onnx_dtype

    n_own = len(signature) - len(captures)
    input_names, graph_inputs = [], []
    for i, typed in enumerate(signature):
        if typed is None:
            input_names.append("")
            continue
        dtype, shape = typed
        name = f"in_{i}" if i < n_own else captures[i - n_own]
        input_names.append(name)
        graph_inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), shape))
    total = len(out_types) + len(skip_outputs)
    present = [i for i in range(total) if i not in set(skip_outputs)]
    out_names = [f"out_{i}" if i in present else "" for i in range(total)]
    node = onnx.NodeProto()
    node.op_type, node.domain = op_type, domain
    node.input.extend(input_names[:n_own])
    node.output.extend(out_names)
    node.attribute.extend(attributes.protos() if attributes is not None else [])
    if not domain:
        _declare_body_outputs(node, len(input_names) - len(captures), out_types, skip_outputs)
    outputs = [helper.make_tensor_value_info(out_names[i], onnx_dtype(t.dtype), None)
               for i, t in zip(present, out_types)]
    graph = helper.make_graph([node], f"{op_type}_reference", graph_inputs, outputs)
    imports = dict(opsets)
    imports.setdefault("", 17)
    opset_ids = [helper.make_opsetid(d, v) for d, v in sorted(imports.items())]
    model = helper.make_model(graph, opset_imports=opset_ids,
                              ir_version=helper.find_min_ir_version_for(opset_ids, ignore_unknown=True))
    model.functions.extend(onnx.FunctionProto.FromString(f) for f in functions)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types; report them the same way
        where = f"{domain}::{op_type}" if domain else op_type
        raise OpError(f"ONNX op {where} has no torch reference and ONNX Runtime cannot run it alone: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return session, input_names


@functools.lru_cache(maxsize=1024)
def _has_body(domain, op_type, attributes, opsets, functions) -> bool:
    """The node runs a subgraph or a function body (model-local, or the op's own ONNX function)."""
    import onnx

    if functions or any(p.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for p in (attributes.protos() if attributes is not None else [])):
        return True
    try:
        schema = onnx.defs.get_schema(op_type, dict(opsets).get(domain, 1), domain)
    except Exception:  # onnx.defs raises SchemaError for ops it does not know (contrib ops)
        return False
    return schema.has_function or schema.has_context_dependent_function


def _declare_body_outputs(node, n_inputs: int, out_types, skip_outputs) -> None:
    """Give the untyped outputs of a Scan/Loop/If body the ranks the node's output types imply:
    ONNX Runtime refuses to run a subgraph whose outputs have no shape, and the node alone often
    lacks what inferred it in the whole model (captured constant axes)."""
    from onnx import helper

    from graphopt.ir.onnx_common import onnx_dtype

    present = [i for i in range(len(out_types) + len(skip_outputs)) if i not in set(skip_outputs)]
    types = dict(zip(present, out_types))
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Scan" and "body" in attrs:
        scan_inputs = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
        states = n_inputs - scan_inputs
        bodies, first, stacked_from = [attrs["body"].g], 0, states
    elif node.op_type == "Loop" and "body" in attrs:
        bodies, first, stacked_from = [attrs["body"].g], 1, n_inputs - 2  # body outputs: cond, carried..., scans...
    elif node.op_type == "If":
        bodies = [attrs[k].g for k in ("then_branch", "else_branch") if k in attrs]
        first, stacked_from = 0, len(types) + len(skip_outputs)
    else:
        return
    for body in bodies:
        for position, t in types.items():
            out = body.output[first + position] if first + position < len(body.output) else None
            if out is None or (out.type.HasField("tensor_type") and out.type.tensor_type.HasField("shape")):
                continue
            rank = t.rank - 1 if position >= stacked_from else t.rank
            if rank >= 0:
                out.type.CopyFrom(helper.make_tensor_type_proto(onnx_dtype(t.dtype), [None] * rank))
