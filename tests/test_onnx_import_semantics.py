"""ONNX import edge cases checked against ONNX Runtime: ranks shape inference cannot tell stay unknown
(never a scalar), run-time reduction axes, negative gather indices, reductions over an empty axis,
and subgraph ops (Scan/Loop) whose single-node references need their input and body ranks."""
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.torch_backend import run
from graphopt.frontends.onnx import OnnxLoadError, from_onnx
from graphopt.frontends.onnx.opaque import _ort_is_scalar

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def model_of(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def untyped(name):
    return helper.make_value_info(name, onnx.TypeProto())


def assert_matches_onnxruntime(model, feeds):
    """The IR graph on the torch backend gives ONNX Runtime's results on the file, and declares their ranks."""
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    graph = from_onnx(model)
    got = run(graph, *[torch.from_numpy(feeds[v.name]) for v in graph.inputs])
    got = got if isinstance(got, tuple) else (got,)
    for value, g, e in zip(graph.outputs, got, expected):
        assert value.type.rank == e.ndim
        assert g.shape == e.shape
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-6, atol=1e-6)
    return graph


# ---- a rank nobody can infer is unknown, not a scalar -------------------------------------------
def reshape_then_count(shape_dims, declare_y=False):
    """y = Reshape(x[13], s) with s a graph input; total = ReduceSum(Shape(y)) is 13 for s = [13]."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"]), helper.make_node("Shape", ["y"], ["shape"]),
             helper.make_node("ReduceSum", ["shape"], ["total"], keepdims=0)]
    model = model_of(nodes, [helper.make_tensor_value_info("x", F, [13]), helper.make_tensor_value_info("s", I64, shape_dims)],
                     [helper.make_tensor_value_info("total", I64, None)], opset=17)
    if declare_y:
        model.graph.value_info.append(helper.make_tensor_value_info("y", F, ["n"]))
    return model


def test_an_unknown_rank_is_refused_naming_the_node_instead_of_read_as_a_scalar():
    # neither onnx nor onnxruntime can tell y's rank (onnxruntime reports it as [], like a scalar's)
    with pytest.raises(OnnxLoadError, match=r"cannot tell the rank of output 'y' of node #0 \(Reshape\).*value_info"):
        from_onnx(reshape_then_count(["k"]))


@pytest.mark.parametrize("shape_dims,declare_y", [([1], False), (["k"], True)])
def test_a_rank_from_the_shape_operand_or_from_value_info_gives_the_right_count(shape_dims, declare_y):
    feeds = {"x": np.arange(13, dtype=np.float32), "s": np.array([13], np.int64)}
    graph = assert_matches_onnxruntime(reshape_then_count(shape_dims, declare_y), feeds)
    assert graph.outputs[0].type.rank == 0


def test_onnxruntime_probe_tells_a_scalar_from_an_unknown_rank():
    scalar = model_of([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
                      [helper.make_tensor_value_info("x", F, [2, 3])], [untyped("y")], opset=17)
    unknown = model_of([helper.make_node("Reshape", ["x", "s"], ["y"])],
                       [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("s", I64, ["k"])],
                       [untyped("y")], opset=17)
    assert _ort_is_scalar(scalar, "y", torch.float32)
    assert not _ort_is_scalar(unknown, "y", torch.float32)


@pytest.mark.parametrize("op,keepdims", [("ReduceSum", 1), ("ReduceSumSquare", 1), ("ReduceMax", 0)])
def test_reductions_over_run_time_axes_keep_their_rank(op, keepdims):
    model = model_of([helper.make_node(op, ["x", "axes"], ["r"], keepdims=keepdims), helper.make_node("Sqrt", ["r"], ["y"])],
                     [helper.make_tensor_value_info("x", F, [3, 2, 2]), helper.make_tensor_value_info("axes", I64, [1])],
                     [untyped("y")])
    x = np.random.default_rng(0).uniform(0.1, 1, (3, 2, 2)).astype(np.float32)
    assert_matches_onnxruntime(model, {"x": x, "axes": np.array([2], np.int64)})


# ---- torch backend: negative indices, empty reductions ------------------------------------------
@pytest.mark.parametrize("op,indices,constant_data", [
    ("Gather", [0, -1, -3], False), ("Gather", [0, -1, -3], True), ("Gather", [[0, -1], [-2, 1]], True),
    ("GatherElements", [[0, -1, 2, -3]], False), ("GatherElements", [[0, -1, 2, -3]], True)])
def test_negative_run_time_gather_indices_count_from_the_end(op, indices, constant_data):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    idx = np.array(indices, np.int64)
    inputs = [helper.make_tensor_value_info("i", I64, list(idx.shape))]
    if not constant_data:
        inputs.insert(0, helper.make_tensor_value_info("x", F, [3, 4]))
    model = model_of([helper.make_node(op, ["x", "i"], ["y"], axis=0)], inputs, [untyped("y")],
                     [numpy_helper.from_array(data, "x")] if constant_data else [])
    graph = assert_matches_onnxruntime(model, {"i": idx} if constant_data else {"x": data, "i": idx})
    assert "onnx_opaque" not in graph.op_counts()  # the IR's own gather ops, not ONNX Runtime's


@pytest.mark.parametrize("op,keepdims,axes", itertools.product(
    ["ReduceSum", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd"], [0, 1], [[1], [0, 1], None]))
def test_reductions_over_an_empty_axis_match_onnxruntime(op, keepdims, axes):
    inits = [] if axes is None else [numpy_helper.from_array(np.array(axes, np.int64), "axes")]
    model = model_of([helper.make_node(op, ["x"] + ([] if axes is None else ["axes"]), ["y"], keepdims=keepdims)],
                     [helper.make_tensor_value_info("x", F, [2, 0, 4])], [untyped("y")], inits)
    assert_matches_onnxruntime(model, {"x": np.zeros((2, 0, 4), np.float32)})


# ---- subgraph ops run alone in ONNX Runtime ------------------------------------------------------
def test_scan_whose_body_squeezes_with_a_captured_constant_runs_alone():
    """LinearAttention's function body in miniature: the Scan body reads its Squeeze axes from the outer
    scope, so the node alone (its reference) only knows its body's output ranks from the IR types."""
    body = helper.make_graph(
        [helper.make_node("Unsqueeze", ["v", "neg2"], ["row"]), helper.make_node("MatMul", ["row", "state_in"], ["prod"]),
         helper.make_node("Squeeze", ["prod", "neg2"], ["out"]), helper.make_node("Add", ["state_in", "state_in"], ["state_out"])],
        "body", [untyped("state_in"), untyped("v")], [untyped("state_out"), untyped("out")])
    nodes = [helper.make_node("Scan", ["state", "xs"], ["final", "outs"], num_scan_inputs=1, body=body),
             helper.make_node("Relu", ["outs"], ["y"])]
    model = model_of(nodes, [helper.make_tensor_value_info("state", F, [4, 4]), helper.make_tensor_value_info("xs", F, [3, 4])],
                     [untyped("final"), untyped("y")], [numpy_helper.from_array(np.array([-2], np.int64), "neg2")])
    rng = np.random.default_rng(0)
    graph = assert_matches_onnxruntime(model, {"state": rng.standard_normal((4, 4)).astype(np.float32),
                                               "xs": rng.standard_normal((3, 4)).astype(np.float32)})
    assert graph.op_counts().get("onnx_opaque") == 1


def test_loop_with_scan_outputs_runs_alone():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["acc", "step"], ["acc_out"]),
         helper.make_node("Identity", ["acc"], ["seen"])],
        "body", [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 untyped("acc")], [untyped("cond_out"), untyped("acc_out"), untyped("seen")])
    model = model_of([helper.make_node("Loop", ["n", "", "start"], ["last", "all"], body=body)],
                     [helper.make_tensor_value_info("n", I64, []), helper.make_tensor_value_info("start", F, [2])],
                     [helper.make_tensor_value_info("last", F, [2]), helper.make_tensor_value_info("all", F, [None, 2])],
                     [numpy_helper.from_array(np.array([0.5, -1.0], np.float32), "step")])
    assert_matches_onnxruntime(model, {"n": np.array(4, np.int64), "start": np.array([1.0, 2.0], np.float32)})



def test_loop_outputs_nobody_declares_take_the_bodys_ranks():
    """Shape inference leaves a Loop's carried values untyped (their sizes may change between iterations):
    the rank comes from the body's declared outputs and the initial value; a scan output adds one axis."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["acc", "step"], ["acc_out"]),
         helper.make_node("Identity", ["acc"], ["seen"])],
        "body", [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc", F, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", F, [2]),
         helper.make_tensor_value_info("seen", F, [2])])
    model = model_of([helper.make_node("Loop", ["n", "", "start"], ["last", "all"], body=body),
                      helper.make_node("Mul", ["last", "start"], ["y"]), helper.make_node("ReduceSum", ["all"], ["z"])],
                     [helper.make_tensor_value_info("n", I64, []), helper.make_tensor_value_info("start", F, [2])],
                     [helper.make_tensor_value_info("y", F, None), helper.make_tensor_value_info("z", F, None)],
                     [numpy_helper.from_array(np.array([0.5, -1.0], np.float32), "step")])
    graph = assert_matches_onnxruntime(model, {"n": np.array(3, np.int64), "start": np.array([1.0, 2.0], np.float32)})
    loop_outputs = [v for n in graph.nodes if n.op == "onnx_opaque" and n.attrs["op_type"] == "Loop" for v in n.outputs]
    assert [v.type.rank for v in loop_outputs] == [1, 2]


# ---- the exporters' Linear ------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["matmul_add", "matmul_transpose_add", "gemm", "matmul_shared_weight"])
def test_matmul_with_a_constant_weight_reads_as_linear(form):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # [in, out], as MatMul(x, Wᵀ) stores it
    b = rng.standard_normal(4).astype(np.float32)
    inits = [numpy_helper.from_array(b, "b")]
    if form == "matmul_transpose_add":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "w_out_in"))
        nodes = [helper.make_node("Transpose", ["w_out_in"], ["w"], perm=[1, 0])]
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes = []
    if form == "gemm":
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y"]))
        x_shape = [3, 6]
    else:
        nodes += [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
        x_shape = [2, 3, 6]
    outputs = [untyped("y")]
    if form == "matmul_shared_weight":  # the MatMul's result is read twice: the bias stays a separate add
        nodes.append(helper.make_node("Relu", ["mm"], ["z"]))
        outputs.append(untyped("z"))
    model = model_of(nodes, [helper.make_tensor_value_info("x", F, x_shape)], outputs, inits)
    graph = assert_matches_onnxruntime(model, {"x": rng.standard_normal(x_shape).astype(np.float32)})
    counts = graph.op_counts()
    assert counts["linear"] == 1 and "matmul" not in counts
    assert counts.get("add", 0) == (1 if form == "matmul_shared_weight" else 0)
