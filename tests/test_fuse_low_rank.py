"""fuse_low_rank and the low_rank_mlp op: torch CPU path, Triton kernel (interpreter), ONNX lowering."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch
import torch.nn.functional as F

from graphopt.backends.torch_backend import run
from graphopt.frontends import from_torch
from graphopt.ir import Graph, OpError, TensorType, verify
from graphopt.ir.cost import graph_cost
from graphopt.passes import PassManager

F32 = torch.float32
ACTS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": torch.relu, "silu": F.silu,
        "none": lambda t: t}


def factors(n=24, h=80, m=20, r1=6, r2=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a1": (r1, n), "b1": (h, r1), "bias1": (h,), "a2": (r2, h), "b2": (m, r2), "bias2": (m,)}
    return {k: (torch.randn(*s, generator=g, dtype=dtype) / s[-1] ** 0.5) for k, s in shapes.items()}


def reference(x, f, act):
    """The unfused chain, written out independently of the op's code."""
    hidden = ACTS[act](F.linear(F.linear(x, f["a1"]), f["b1"], f["bias1"]))
    return F.linear(F.linear(hidden, f["a2"]), f["b2"], f["bias2"])


def factorised_graph(f, act, n=24):
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 7, n)))
    c = {k: g.add_constant(v.float(), k) for k, v in f.items()}
    hid = g.op.linear(g.op.linear(x, c["a1"]), c["b1"], c["bias1"])
    if act == "gelu_tanh":
        hid = g.op.gelu(hid, approximate="tanh")
    elif act != "none":
        hid = getattr(g.op, act)(hid)
    g.set_outputs([g.op.linear(g.op.linear(hid, c["a2"]), c["b2"], c["bias2"])])
    return g


@pytest.mark.parametrize("act", sorted(ACTS))
def test_fused_op_equals_unfused_reference_on_the_torch_backend(act):
    f = factors()
    g = factorised_graph(f, act)
    out, report = PassManager([("fuse_low_rank", {"tile": 32})]).run(g)   # 80 = 32 + 32 + 16: a ragged tile
    verify(out)
    assert out.op_counts() == {"low_rank_mlp": 1}
    assert report["fuse_low_rank"].counters == {"fused": 1}
    x = torch.randn(3, 7, 24)
    expected = reference(x.double(), f, act)
    torch.testing.assert_close(run(out, x)[0].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(out, x)[0], run(g, x)[0], atol=1e-5, rtol=1e-5)


def test_fusion_is_refused_when_the_hidden_layer_is_used_elsewhere():
    f = factors()
    g = factorised_graph(f, "relu")
    relu = g.find_nodes("relu")[0]
    g.set_outputs(list(g.outputs) + [relu.output])
    out, report = PassManager(["fuse_low_rank"]).run(g)
    assert "low_rank_mlp" not in out.op_counts()
    assert report["fuse_low_rank"].counters["skipped_hidden_used_elsewhere"] == 1


def test_low_rank_then_fuse_on_a_captured_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    g = from_torch(model, (torch.randn(2, 9, 32),))
    out, _ = PassManager([("low_rank", {"method": "svd", "ratio": 0.5}), "fuse_low_rank"]).run(g)
    assert out.op_counts() == {"low_rank_mlp": 1}
    factorised, _ = PassManager([("low_rank", {"method": "svd", "ratio": 0.5})]).run(g)
    x = torch.randn(5, 9, 32)
    torch.testing.assert_close(run(out, x)[0], run(factorised, x)[0], atol=1e-5, rtol=1e-5)
    # the cost model sees the fused op as the same FLOPs as the chain it replaced (+ nothing unknown)
    fused_cost, chain_cost = graph_cost(out), graph_cost(factorised)
    assert not fused_cost.unknown
    assert fused_cost.total.at(batch=5)["flops"] == chain_cost.total.at(batch=5)["flops"]


def test_bad_factor_shapes_are_rejected():
    f = factors()
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 24)))
    c = {k: g.add_constant(v.float(), k) for k, v in f.items()}
    with pytest.raises(OpError, match="do not chain"):
        g.op.low_rank_mlp(x, c["a1"], c["b2"], c["bias1"], c["a2"], c["b2"], c["bias2"])
    with pytest.raises(OpError, match="activation 'tanh' is not one of"):
        g.op.low_rank_mlp(x, c["a1"], c["b1"], c["bias1"], c["a2"], c["b2"], c["bias2"], activation="tanh")


@pytest.mark.parametrize("act", ["gelu", "relu", "silu", "gelu_tanh", "none"])
def test_triton_kernel_equals_unfused_reference_in_the_interpreter(act, triton_interpreter):
    from graphopt.backends.triton_low_rank import low_rank_mlp
    f = factors(n=40, h=100, m=36, r1=7, r2=19, seed=3, dtype=torch.float32)  # ragged against every block size
    x = torch.randn(45, 40)
    got = low_rank_mlp(x, f["a1"], f["b1"], f["bias1"], f["a2"], f["b2"], f["bias2"], activation=act)
    expected = reference(x.double(), {k: v.double() for k, v in f.items()}, act)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_the_triton_target_runs_a_fused_graph(triton_interpreter):
    # the kernel registered for target "triton" once lacked the op's tile attribute: TypeError on any real graph
    from graphopt.backends.torch_backend import TorchExecutable
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    g, _ = PassManager([("low_rank", {"method": "svd", "ratio": 0.5}), "fuse_low_rank"]).run(
        from_torch(model, (torch.randn(2, 9, 32),)))
    x = torch.randn(3, 9, 32)
    got = TorchExecutable(g, target="triton").run_flat(x)[0]
    torch.testing.assert_close(got, run(g, x)[0], atol=1e-5, rtol=1e-5)


def test_onnx_runtime_runs_the_lowered_fused_op():
    pytest.importorskip("onnxruntime")
    from graphopt.backends.onnx import to_onnx
    from graphopt.backends.registry import lower
    f = factors()
    out, _ = PassManager(["fuse_low_rank"]).run(factorised_graph(f, "gelu"))
    model = to_onnx(out)
    assert [n.op_type for n in model.graph.node].count("MatMul") == 4
    x = torch.randn(3, 7, 24)
    ort = lower(out, "onnxruntime", threads=1)
    torch.testing.assert_close(ort.run_flat(x)[0], run(out, x)[0], atol=1e-5, rtol=1e-5)


def test_low_rank_then_fuse_on_an_onnx_imported_mlp_with_erf_gelu():
    """The legacy exporter writes GELU as Div/Erf/Add/Mul/Mul and Linear as MatMul + Add."""
    pytest.importorskip("onnx")
    import io
    from graphopt.frontends import from_onnx
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.randn(2, 9, 32),), buf, input_names=["x"], dynamic_axes={"x": {0: "batch"}},
                      dynamo=False, opset_version=17)
    g = from_onnx(buf.getvalue())
    assert "erf" in g.op_counts() and "gelu" not in g.op_counts()
    factorise = ("low_rank", {"method": "svd", "ratio": 0.5})
    out, report = PassManager([factorise, "fuse_low_rank"]).run(g)
    assert out.op_counts() == {"low_rank_mlp": 1}
    assert report["fuse_low_rank"].counters["fuse_gelu.erf"] == 1
    assert out.find_nodes("low_rank_mlp")[0].attrs["activation"] == "gelu"
    factorised, _ = PassManager([factorise]).run(g)
    x = torch.randn(5, 9, 32)
    torch.testing.assert_close(run(out, x)[0], run(factorised, x)[0], atol=1e-5, rtol=1e-5)
