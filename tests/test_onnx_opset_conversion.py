"""ONNX files older than opset 13 are read through onnx.version_converter (with a warning), and give
ONNX Runtime's results on the original file; a conversion that fails or changes the model's
interface is refused naming the op."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.torch_backend import run
from graphopt.frontends.onnx import CONVERT_TO_OPSET, OnnxLoadError, OpsetConverted, from_onnx

F = TensorProto.FLOAT


def old_model(opset, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=6)


def conv_block(opset):
    """Conv -> BatchNorm -> Relu -> Upsample (opset 7/9) or Resize (10+) -> Reshape, as old exporters wrote them."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
              [("gamma", rng.uniform(0.5, 2, 4)), ("beta", rng.standard_normal(4)), ("mean", rng.standard_normal(4)),
               ("var", rng.uniform(0.5, 2, 4))]]
    inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), "flat"))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["r"])]
    if opset < 9:
        nodes.append(helper.make_node("Upsample", ["r"], ["u"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest"))
    else:
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        nodes.append(helper.make_node("Upsample", ["r", "scales"], ["u"], mode="nearest"))
    nodes.append(helper.make_node("Reshape", ["u", "flat"], ["y"]))
    x = helper.make_tensor_value_info("x", F, [2, 3, 5, 5])
    return old_model(opset, nodes, [x], [helper.make_tensor_value_info("y", F, None)], inits)


@pytest.mark.parametrize("opset", [7, 9, 12])
def test_old_opsets_are_converted_with_a_warning_and_match_onnxruntime(opset):
    model = conv_block(opset) if opset < 12 else old_model(
        12, [helper.make_node("Softmax", ["x"], ["y"], axis=1)],  # opset-12 Softmax flattens from axis 1
        [helper.make_tensor_value_info("x", F, [2, 3, 4])], [helper.make_tensor_value_info("y", F, None)])
    x = np.random.default_rng(1).standard_normal([int(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim])
    x = x.astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with pytest.warns(OpsetConverted, match=f"opset {opset} converted to opset {CONVERT_TO_OPSET}"):
        graph = from_onnx(model)
    assert graph.meta["onnx_opsets"][""] == CONVERT_TO_OPSET
    got = run(graph, torch.from_numpy(x))
    got = got[0] if isinstance(got, tuple) else got
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_current_opsets_are_not_converted():
    model = old_model(13, [helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, [2])],
                      [helper.make_tensor_value_info("y", F, [2])])
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpsetConverted)
        assert from_onnx(model).meta["onnx_opsets"][""] == 13


@pytest.mark.parametrize("op", ["ImageScaler", "Crop"])
def test_an_op_the_converter_cannot_convert_is_named(op):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, ["r"], ["y"], name="legacy")]
    model = old_model(7, nodes, [helper.make_tensor_value_info("x", F, [1, 3, 4, 4])],
                      [helper.make_tensor_value_info("y", F, None)])
    with pytest.raises(OnnxLoadError, match=rf"cannot convert node 'legacy' \({op}\) to opset {CONVERT_TO_OPSET}.*"
                                            "re-export the model at opset 13"):
        from_onnx(model)


def test_a_conversion_that_changes_the_interface_is_refused():
    """onnx.version_converter turns a Scan-8 (with a batch axis) into a Scan-9 by dropping the axis from
    the graph's inputs: the converted model no longer takes the file's inputs."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "v"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["scan_out"])],
        "body", [helper.make_tensor_value_info(n, F, [2]) for n in ("s_in", "v")],
        [helper.make_tensor_value_info(n, F, [2]) for n in ("s_out", "scan_out")])
    scan = helper.make_node("Scan", ["", "init", "xs"], ["y", "z"], num_scan_inputs=1, body=body)
    model = old_model(8, [scan], [helper.make_tensor_value_info("init", F, [1, 2]),
                                  helper.make_tensor_value_info("xs", F, [1, 3, 2])],
                      [helper.make_tensor_value_info("y", F, [1, 2]), helper.make_tensor_value_info("z", F, [1, 3, 2])])
    with pytest.raises(OnnxLoadError, match=r"changes the type of 'init'.*\[1,2\] to \[2\].*Scan"):
        from_onnx(model)
