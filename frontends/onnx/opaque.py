"""``onnx_opaque`` nodes: an ONNX op with no IR translation (any domain, control flow, model-local
functions) is kept exactly, and the IR needs the types of its outputs.

They come from onnx shape inference of the node alone (its inputs typed with their IR types), else
from onnxruntime's (it knows the ``com.microsoft`` contrib ops), else from whole-model inference;
the rank of a ``Reduce*`` with run-time axes and of a ``Loop``'s outputs is worked out here, as
neither infers it. An output whose dtype or rank no source can tell is refused, naming the node.
"""
from __future__ import annotations

import onnx
import torch
from onnx import helper

from graphopt.frontends import OnnxLoadError
from graphopt.frontends.onnx.load import copy_model
from graphopt.frontends.onnx.validate import DEFAULT_DOMAINS, MIN_OPSET, node_label, subgraph_free_names
from graphopt.ir import TensorType
from graphopt.ir.onnx_common import ONNX_TO_TORCH, onnx_dtype, tensor_to_proto
from graphopt.ir.ops.onnx_opaque import OP as OPAQUE, OnnxAttributes
from graphopt.ir.types import format_dim


def add_opaque(cv, node: onnx.NodeProto, index: int, domain: str, ins: list, reason: str) -> None:
    """The node as an ``onnx_opaque`` IR node; ``reason`` (why no handler translated it) goes in its meta."""
    captures = tuple(sorted(subgraph_free_names(node)))
    capture_values = [cv.env[c] for c in captures]
    present = [i for i, o in enumerate(node.output) if o]
    skip = tuple(i for i, o in enumerate(node.output) if not o and i < (present[-1] if present else -1))
    out_names = [node.output[i] for i in present]
    types = _output_types(cv, node, index, ins, captures, capture_values, out_names)
    opsets = {"": cv.opsets.get("", MIN_OPSET)}
    if domain:
        opsets[domain] = cv.opsets.get(domain, 1)
    functions = _functions_for(cv, node, domain, opsets)
    attrs = {"domain": domain, "op_type": node.op_type, "attributes": OnnxAttributes(node.attribute),
             "opsets": tuple(sorted(opsets.items())), "out_types": tuple(types), "skip_outputs": skip,
             "captures": captures, "functions": functions}
    inputs = list(ins) + capture_values
    ir_node = cv.graph.create_node(OPAQUE, inputs, attrs, names=out_names,
                                     meta={"onnx_name": node.name, "source": node.name or node.op_type,
                                           "opaque_reason": reason})
    for name, value in zip(out_names, ir_node.outputs):
        cv.env[name] = value


def _functions_for(cv, node, domain, opsets) -> tuple[bytes, ...]:
    """The model-local functions the node calls, directly or through other functions (their opsets added)."""
    found: list[onnx.FunctionProto] = []
    pending = [(domain, node.op_type)]
    seen = set()
    while pending:
        key = pending.pop()
        if key in seen or key not in cv.functions:
            continue
        seen.add(key)
        f = cv.functions[key]
        found.append(f)
        for imp in f.opset_import:
            opsets.setdefault("" if imp.domain in DEFAULT_DOMAINS else imp.domain, int(imp.version))
        for n in f.node:
            pending.append(("" if n.domain in DEFAULT_DOMAINS else n.domain, n.op_type))
    return tuple(f.SerializeToString(deterministic=True) for f in found)


def _output_types(cv, node, index, ins, captures, capture_values, out_names) -> list[TensorType]:
    probe = _node_model(cv, node, ins, captures, capture_values)
    local = _infer_node(cv, node, probe)
    if any(local.get(n, (None, None))[0] is None or local.get(n, (None, None))[1] is None for n in out_names):
        for name, (dtype, dims) in _ort_infer_node(cv, node, probe).items():
            ldtype, ldims = local.get(name, (None, None))
            local[name] = (ldtype or dtype, ldims if ldims is not None else dims)
    types = []
    for name in out_names:
        ldtype, ldims = local.get(name, (None, None))
        gdtype, gdims = cv.onnx_type(name)
        dtype = ldtype or gdtype
        dims = ldims if ldims is not None else gdims if gdims is not None else _reduction_dims(node, ins)
        if dims is None:
            dims = _loop_dims(node, ins, list(node.output).index(name))
        if dtype is None or dims is None:
            what = "dtype" if dtype is None else "rank"
            raise OnnxLoadError(f"{cv.where}: cannot tell the {what} of output '{name}' of "
                                f"{node_label(node, index)}: neither onnx nor onnxruntime shape inference "
                                "can (an op they do not know, or a result that depends on run-time values); "
                                "add value_info for it to the model")
        merged = []
        for i, d in enumerate(dims):
            if d is None and gdims is not None and len(gdims) == len(dims):
                d = gdims[i]
            merged.append(d if d is not None else cv.fresh_dim())
        types.append(TensorType(dtype, tuple(merged)))
    return types


def _node_model(cv, node, ins, captures, capture_values) -> onnx.ModelProto:
    """The node alone, its inputs typed with their IR types (symbolic dims as dim_params)."""
    graph_inputs, initializers, names = [], [], []
    for i, v in enumerate(ins):
        if v is None:
            names.append("")
            continue
        name = f"__in{i}"
        names.append(name)
        if v.is_constant and v.const.numel() <= 4096:
            initializers.append(tensor_to_proto(v.const, name))
        else:
            graph_inputs.append(_value_info(name, v.type))
    for name, v in zip(captures, capture_values):  # a subgraph's Squeeze axes are often captured constants
        if v.is_constant and v.const.numel() <= 4096:
            initializers.append(tensor_to_proto(v.const, name))
        else:
            graph_inputs.append(_value_info(name, v.type))
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(names)
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
    g = helper.make_graph([copy], "node", graph_inputs, outputs, initializer=initializers)
    imports = [helper.make_opsetid(d, v) for d, v in sorted(cv.opsets.items())]
    model = helper.make_model(g, opset_imports=imports, ir_version=max(
        helper.find_min_ir_version_for(imports, ignore_unknown=True), min(cv.model.ir_version, 10)))
    model.functions.extend(cv.functions[k] for k in sorted(cv.functions))
    return model


def _infer_node(cv, node, model) -> dict[str, tuple]:
    """onnx shape inference of the node alone."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # unknown op or an inference bug: other sources follow
        return {}
    found = {}
    for vi in list(inferred.graph.output) + list(inferred.graph.value_info):
        if vi.name in node.output and vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            dtype = ONNX_TO_TORCH.get(tt.elem_type) if tt.elem_type else None
            dims = [cv.dim(d, fresh=False) for d in tt.shape.dim] if tt.HasField("shape") else None
            found[vi.name] = (dtype, dims)
    return found


def _ort_infer_node(cv, node, model) -> dict[str, tuple]:
    """onnxruntime's type inference of the node alone: it knows the com.microsoft contrib ops.

    onnxruntime reports both an unknown shape and a rank-0 one as ``[]``; such an output is
    probed again (``_ort_is_scalar``) and stays unknown unless it is provably a scalar."""
    session = _ort_session(model)
    if session is None:  # onnxruntime does not know the op either
        return {}
    found = {}
    for out in session.get_outputs():
        dtype = _ORT_TYPES.get(out.type)
        dims = None
        if isinstance(out.shape, list) and (out.shape or _ort_is_scalar(model, out.name, dtype)):
            dims = [d if isinstance(d, int) else cv.named_dim(d) if isinstance(d, str) else None for d in out.shape]
        found[out.name] = (dtype, dims)
    return found


def _reduction_dims(node: onnx.NodeProto, ins: list) -> list | None:
    """The rank of a Reduce* whose axes come at run time, which shape inference leaves unknown:
    the input's with ``keepdims`` (sizes unknown), else the input's less the number of axes."""
    if not node.op_type.startswith("Reduce") or node.domain not in DEFAULT_DOMAINS or not ins or ins[0] is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = ins[0].type.rank
    axes = ins[1] if len(ins) > 1 else None
    if axes is None and "axes" not in attrs:
        return [None] * rank if attrs.get("keepdims", 1) or attrs.get("noop_with_empty_axes", 0) else []
    if attrs.get("keepdims", 1):
        return [None] * rank
    count = len(attrs["axes"]) if axes is None else axes.type.shape[0] if axes.type.rank == 1 else None
    if not isinstance(count, int) or count == 0:  # no axes reduces everything, or nothing (noop_with_empty_axes)
        return None
    return [None] * (rank - count)


def _loop_dims(node: onnx.NodeProto, ins: list, k: int) -> list | None:
    """The rank of a Loop's output ``k``, which shape inference leaves unknown for carried values (their
    sizes may change between iterations): a carried value keeps the rank that its initial value and the
    body's declared output agree on; a scan output has one more axis, the iterations. Sizes stay unknown."""
    if node.op_type != "Loop" or node.domain not in DEFAULT_DOMAINS:
        return None
    body = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "body"), None)
    if body is None or k + 1 >= len(body.output) or not body.output[k + 1].type.tensor_type.HasField("shape"):
        return None
    rank = len(body.output[k + 1].type.tensor_type.shape.dim)
    carried = len(node.input) - 2
    if k >= carried:
        return [None] * (rank + 1)
    initial = ins[2 + k] if 2 + k < len(ins) else None
    return [None] * rank if initial is not None and initial.type.rank == rank else None


def _ort_session(model: onnx.ModelProto, strict: bool = False):
    """An onnxruntime session of a probe model (None when onnxruntime refuses it); ``strict``: a
    declared output shape that contradicts the inferred one is an error instead of a warning."""
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4
        if strict:
            options.add_session_config_entry("session.strict_shape_type_inference", "1")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own exception types
        return None


def _ort_is_scalar(model: onnx.ModelProto, output: str, dtype: torch.dtype | None) -> bool:
    """Whether onnxruntime infers rank 0 for ``output`` (it reports an unknown shape the same way):
    declared rank 0 must be accepted and declared rank 1 refused, under strict inference."""
    if dtype is None:
        return False

    def probe(rank: int) -> bool:
        declared = copy_model(model)
        for vi in declared.graph.output:
            if vi.name == output:
                vi.type.CopyFrom(helper.make_tensor_type_proto(onnx_dtype(dtype), [None] * rank))
        return _ort_session(declared, strict=True) is not None

    return probe(0) and not probe(1)


_ORT_TYPES = {f"tensor({name})": dtype for name, dtype in [
    ("float", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16), ("double", torch.float64),
    ("int64", torch.int64), ("int32", torch.int32), ("int16", torch.int16), ("int8", torch.int8),
    ("uint8", torch.uint8), ("bool", torch.bool)]}


def _value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    shape = [d if isinstance(d, int) else format_dim(d) for d in t.shape]
    return helper.make_tensor_value_info(name, onnx_dtype(t.dtype), shape)


__all__ = ["add_opaque"]
