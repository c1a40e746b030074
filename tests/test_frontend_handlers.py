"""The frontends' handler registries: a plugin's handler translates an op the frontends keep opaque
(registered in-process, or from an installed package through the entry-point groups
``graphopt.onnx_handlers`` / ``graphopt.aten_handlers``); a second handler for an op that has one
is refused unless replaced on purpose."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from onnx import TensorProto, helper

from graphopt.frontends import Unsupported, from_onnx, from_torch
from graphopt.frontends.aten_ops import HANDLERS as ATEN_HANDLERS, handles as aten_handles
from graphopt.frontends.onnx import HANDLERS as ONNX_HANDLERS, handles
from graphopt.ir.interpreter import run
from graphopt.ir.registry import RegistryError

F = TensorProto.FLOAT


def one_node_model(op_type, domain="", **attrs):
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain or None, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, ["batch", 5])],
                              [helper.make_tensor_value_info("y", F, ["batch", 5])])
    imports = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=8)


def ops(graph):
    return [n.op for n in graph.nodes]


def test_a_registered_handler_translates_an_op_of_another_domain():
    model = one_node_model("Double", domain="graphopt_test")
    assert ops(from_onnx(model)) == ["onnx_opaque"]

    @handles("graphopt_test::Double")
    def double(cv, node, ins):
        return cv.op.add(ins[0], ins[0])

    graph = from_onnx(model)
    assert ops(graph) == ["add"]
    x = torch.randn(3, 5)
    torch.testing.assert_close(run(graph, x)[0], x * 2)


def test_a_handler_that_declines_leaves_the_node_opaque_with_its_reason():
    @handles("graphopt_test::Halve")
    def halve(cv, node, ins):
        raise Unsupported("Halve of a float tensor")

    (node,) = from_onnx(one_node_model("Halve", domain="graphopt_test")).nodes
    assert node.op == "onnx_opaque" and node.meta["opaque_reason"] == "Halve of a float tensor"


def test_a_second_onnx_handler_is_refused_unless_replaced():
    builtin = ONNX_HANDLERS.get("Relu")
    with pytest.raises(RegistryError, match=r"ONNX handler 'Relu' is already registered "
                                            r"\(by graphopt\.frontends\.onnx\.handlers_math\).*replace=True"):
        handles("Relu")(lambda cv, node, ins: ins[0])
    assert ONNX_HANDLERS.get("Relu") is builtin

    def declines(cv, node, ins):
        raise Unsupported("replaced on purpose")

    model = one_node_model("Relu")
    try:
        ONNX_HANDLERS.register("Relu", declines, replace=True)
        assert ops(from_onnx(model)) == ["onnx_opaque"]
    finally:
        ONNX_HANDLERS.register("Relu", builtin, replace=True)
    assert ops(from_onnx(model)) == ["relu"]


def test_a_second_aten_handler_is_refused():
    builtin = ATEN_HANDLERS.get("aten::linear")
    with pytest.raises(RegistryError, match=r"ATen handler 'aten::linear' is already registered "
                                            r"\(by graphopt\.frontends\.aten_ops\)"):
        aten_handles(torch.ops.aten.linear.default)(lambda cv, node, args, kwargs: args[0])
    assert ATEN_HANDLERS.get("aten::linear") is builtin


PLUGIN = '''
from graphopt.frontends.aten_ops import HANDLERS as ATEN_HANDLERS
from graphopt.frontends.onnx.handlers import attributes, handles


@handles("HardSigmoid")
def hard_sigmoid(cv, node, ins):
    x, a = ins[0], attributes(node)
    scaled = cv.op.mul(x, cv.scalar(a.get("alpha", 0.2), x.type.dtype))
    return cv.op.clamp(cv.op.add(scaled, cv.scalar(a.get("beta", 0.5), x.type.dtype)), min=0.0, max=1.0)


def aten_hardsigmoid(cv, node, args, kwargs):
    return cv.op.clamp(cv.op.add(cv.op.div(args[0], cv.scalar(6.0)), cv.scalar(0.5)), min=0.0, max=1.0)


ATEN_HANDLERS.register("aten::hardsigmoid", aten_hardsigmoid)
'''

CHECK = '''
import json
import numpy as np
import onnx
import onnxruntime as ort
import torch
from graphopt.frontends import from_onnx, from_torch
from graphopt.ir.interpreter import run

model = onnx.load("hard_sigmoid.onnx")
x = np.linspace(-6, 6, 30, dtype=np.float32).reshape(6, 5)
graph = from_onnx(model)
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
onnx_error = float(np.abs(run(graph, torch.from_numpy(x))[0].numpy() - session.run(None, {"x": x})[0]).max())
module = torch.nn.Hardsigmoid()
tgraph = from_torch(module, (torch.from_numpy(x),))
torch_error = float((run(tgraph, torch.from_numpy(x))[0] - module(torch.from_numpy(x))).abs().max())
print(json.dumps({"onnx_ops": [n.op for n in graph.nodes], "onnx_error": onnx_error,
                  "aten_ops": [n.op for n in tgraph.nodes], "torch_error": torch_error}))
'''


def test_installed_plugins_register_handlers_through_entry_points(tmp_path):
    """A package declaring both entry-point groups translates ONNX HardSigmoid and aten::hardsigmoid,
    which graphopt itself keeps opaque; the results match ONNX Runtime and torch."""
    model = one_node_model("HardSigmoid", alpha=0.3, beta=0.4)
    assert ops(from_onnx(model)) == ["onnx_opaque"]
    assert ops(from_torch(torch.nn.Hardsigmoid(), (torch.randn(2, 5),))) == ["opaque"]

    (tmp_path / "hardsigmoid_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "hardsigmoid_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hardsigmoid-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [graphopt.onnx_handlers]
        hardsigmoid = hardsigmoid_plugin
        [graphopt.aten_handlers]
        hardsigmoid = hardsigmoid_plugin
        """))
    (tmp_path / "hard_sigmoid.onnx").write_bytes(model.SerializeToString())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["onnx_ops"] == ["mul", "add", "clamp"] and result["onnx_error"] < 1e-6
    assert result["aten_ops"] == ["div", "add", "clamp"] and result["torch_error"] < 1e-6
