"""ONNX Runtime backend: every built-in IR op lowers to standard ONNX that passes the full checker
and matches the torch reference backend; torch models run in ORT through optimize(); session
options; saving; plugin lowerings; clear errors for what cannot be lowered."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.backends.onnxruntime_backend import (OnnxRuntimeExecutable, create_session, default_providers,
                                                   model_bytes, register_lowering, to_onnx, write_model)
from graphopt.backends import LoweringError
from graphopt.backends.torch_backend import run
from graphopt.frontends import from_onnx
from graphopt.ir import Graph, TensorType, register_op, same_as_input
from graphopt.ir.registry import RegistryError
from graphopt.ir.types import symbol

B = symbol("batch")
f32, i64 = torch.float32, torch.int64


def assert_backends_agree(graph, inputs, opset=None, atol=1e-5):
    expected = run(graph, *inputs)
    model = to_onnx(graph, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    got = OnnxRuntimeExecutable(graph, opset=opset, threads=1).run_flat(*inputs)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape, (g.dtype, e.dtype, g.shape, e.shape)
        if e.numel():
            assert (g.double() - e.double()).abs().max().item() <= atol
    return model


def single(op, input_dtype=f32, **attrs):
    g = Graph(op)
    x = g.add_input("x", TensorType(input_dtype, (B, 4, 6)))
    g.set_outputs([g.call(op, x, **attrs)])
    return g


X = torch.randn(3, 4, 6)
XI = torch.randint(-5, 5, (3, 4, 6))
POSITIVE = X.abs() + 0.1
WITH_NAN = X.masked_fill(X > 1.0, float("nan"))

UNARY = [("neg", X), ("abs", X), ("relu", X), ("floor", X), ("round", X), ("sign", X), ("tanh", X), ("sigmoid", X),
         ("exp", X), ("log", POSITIVE), ("sqrt", POSITIVE), ("rsqrt", POSITIVE), ("erf", X), ("silu", X), ("sin", X),
         ("cos", X), ("reciprocal", POSITIVE), ("neg", XI), ("abs", XI), ("relu", XI), ("floor", XI), ("sign", XI),
         ("tanh", XI), ("exp", XI), ("logical_not", XI), ("isnan", WITH_NAN), ("isnan", XI)]


@pytest.mark.parametrize("op, x", UNARY, ids=[f"{op}-{x.dtype}".replace("torch.", "") for op, x in UNARY])
def test_unary_ops(op, x):
    assert_backends_agree(single(op, x.dtype), [x])


@pytest.mark.parametrize("op, attrs, x", [
    ("gelu", {}, X), ("gelu", {"approximate": "tanh"}, X), ("clamp", {"min": -0.5, "max": 0.5}, X),
    ("clamp", {"min": -2, "max": 3}, XI), ("clamp", {"min": 0.0}, X), ("cast", {"dtype": torch.int32}, X * 3),
    ("cast", {"dtype": torch.bool}, XI), ("cast", {"dtype": torch.float16}, X), ("softmax", {"dim": 1}, X),
    ("mean", {"dims": (1, 2), "keepdim": True}, X), ("mean", {}, X), ("sum", {"dims": (-1,)}, X),
    ("sum", {"dims": (1,)}, XI), ("amax", {"dims": (1,)}, X), ("permute", {"dims": (2, 0, 1)}, X),
    ("reshape", {"shape": (B * 4, 6)}, X), ("reshape", {"shape": (B, 2, 12)}, X), ("reshape", {"shape": (B, 24, 1)}, X),
    ("slice", {"dim": 1, "start": 1, "end": 3}, X), ("slice", {"dim": 2, "start": -4, "end": 2 ** 62, "step": 2}, X),
    ("slice", {"dim": 0, "start": 0, "end": B - 1}, X), ("select", {"dim": 1, "index": -1}, X),
    ("select", {"dim": 0, "index": B - 1}, X),
])
def test_ops_with_attributes(op, attrs, x):
    assert_backends_agree(single(op, x.dtype, **attrs), [x])


def test_reshape_with_two_symbolic_dims_computes_them_from_input_shapes():
    g = Graph("r")
    x = g.add_input("x", TensorType(f32, (B, symbol("seq"), 6)))
    g.set_outputs([g.op.reshape(g.op.reshape(x, shape=(B * symbol("seq"), 6)), shape=(symbol("seq"), B, 6))])
    model = assert_backends_agree(g, [torch.randn(2, 5, 6)])
    assert "Shape" in {n.op_type for n in model.graph.node}


def binary_graph(op, a, b, **attrs):
    g = Graph(op)
    x = g.add_input("a", TensorType(a.dtype, (B,) + tuple(a.shape[1:])))
    g.set_outputs([g.call(op, x, g.add_constant(b, "b"), **attrs)])
    return g


BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge"]


@pytest.mark.parametrize("op", BINARY)
@pytest.mark.parametrize("other", ["tensor", "int-scalar"])
def test_binary_ops_and_torch_promotion(op, other):
    a = X.abs() + 0.5 if op == "pow" else X
    b = torch.randn(6).abs() + 0.5 if other == "tensor" else torch.tensor(2)
    assert_backends_agree(binary_graph(op, a, b), [a])


@pytest.mark.parametrize("mode", ["none", "trunc", "floor"])
@pytest.mark.parametrize("dtype", [f32, i64])
def test_division_rounding_modes(mode, dtype):
    a = XI.to(dtype) * (1.7 if dtype.is_floating_point else 1)
    b = torch.tensor([3, -3, 2, -2, 5, 7], dtype=dtype)
    assert_backends_agree(binary_graph("div", a, b, rounding_mode=mode), [a])


def test_bool_logic():
    a = XI > 0
    b = torch.tensor([True, False] * 3)
    for op in ("logical_and", "logical_or", "add", "mul"):
        assert_backends_agree(binary_graph(op, a, b), [a])


def test_linear_matmul_conv_norm_attention_embedding():
    g = Graph("nn")
    x = g.add_input("x", TensorType(f32, (B, 4, 6)))
    img = g.add_input("img", TensorType(f32, (B, 4, 9, 9)))
    ids = g.add_input("ids", TensorType(i64, (B, 5)))
    w_rt = g.add_input("w", TensorType(f32, (5, 6)))
    lin = g.op.linear(x, g.add_constant(torch.randn(5, 6)), g.add_constant(torch.randn(5)))
    lin2d = g.op.linear(g.op.reshape(x, shape=(B * 4, 6)), g.add_constant(torch.randn(3, 6)))
    lin_rt = g.op.linear(x, w_rt)
    mm = g.op.matmul(x, g.add_constant(torch.randn(6)))
    conv = g.op.conv2d(img, g.add_constant(torch.randn(8, 2, 3, 3)), g.add_constant(torch.randn(8)),
                       stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    ln = g.op.layer_norm(x, g.add_constant(torch.randn(6)), g.add_constant(torch.randn(6)), normalized_shape=(6,), eps=1e-5)
    ln2 = g.op.layer_norm(x, normalized_shape=(4, 6), eps=1e-6)
    emb = g.op.embedding(g.add_constant(torch.randn(10, 4)), ids)
    g.set_outputs([lin, lin2d, lin_rt, mm, conv, ln, ln2, emb])
    inputs = [torch.randn(3, 4, 6), torch.randn(3, 4, 9, 9), torch.randint(0, 10, (3, 5)), torch.randn(5, 6)]
    for opset in (None, 13, 17):
        assert_backends_agree(g, inputs, opset=opset)


@pytest.mark.parametrize("causal, mask, scale", [(False, None, None), (True, None, 0.3), (False, "bool", None),
                                                 (False, "float", None)])
def test_attention(causal, mask, scale):
    g = Graph("sdpa")
    q = g.add_input("q", TensorType(f32, (B, 2, 5, 8)))
    k = g.add_input("k", TensorType(f32, (B, 2, 7, 8)))
    v = g.add_input("v", TensorType(f32, (B, 2, 7, 4)))
    m = None
    if mask == "bool":
        m = g.add_constant(torch.rand(5, 7) > 0.3)
    elif mask == "float":
        m = g.add_constant(torch.randn(1, 1, 5, 7))
    g.set_outputs([g.op.sdpa(q, k, v, m, is_causal=causal, scale=scale)])
    for opset in (None, 13):
        assert_backends_agree(g, [torch.randn(2, 2, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 4)], opset)


def test_causal_attention_over_symbolic_lengths():
    g = Graph("causal")
    seq = symbol("seq")
    q = g.add_input("q", TensorType(f32, (B, 2, seq, 8)))
    g.set_outputs([g.op.sdpa(q, q, q, is_causal=True)])
    for opset in (None, 13):
        assert_backends_agree(g, [torch.randn(2, 2, 6, 8)], opset)


def test_data_movement_factories_and_output_corner_cases():
    g = Graph("misc")
    a = g.add_input("a", TensorType(f32, (B, 6)))
    i = g.add_input("i", TensorType(i64, (B, 2)))
    c = g.add_input("c", TensorType(torch.bool, (B, 6)))
    one = g.add_input("one", TensorType(f32, (B, 1, 6)))
    r = g.op.relu(a)
    g.set_outputs([
        g.op.gather(a, i, dim=1), g.op.index_select(a, g.add_constant(torch.tensor([0, 5, 2])), dim=1),
        g.op.cat(a, g.op.cast(i, dtype=f32), dim=1), g.op.where(c, a, g.add_constant(torch.tensor(0.0))),
        g.op.expand(one, shape=(B, 5, 6)), g.op.arange(start=0, end=B, step=1, dtype=i64),
        g.op.arange(start=1, end=7, step=2, dtype=f32), g.op.full(shape=(B, 2), value=1.5, dtype=f32),
        g.op.full(shape=(2,), value=True, dtype=torch.bool),
        r, r, a, g.add_constant(torch.ones(2)),  # an output twice, a graph input and a constant as outputs
    ])
    model = assert_backends_agree(g, [torch.randn(3, 6), torch.randint(0, 6, (3, 2)), torch.rand(3, 6) > 0.5,
                                      torch.randn(3, 1, 6)])
    names = [o.name for o in model.graph.output]
    assert len(set(names)) == len(names)


# ---- torch models through optimize(backend="onnxruntime") ----------------------------------------
class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, ids, mask=None, *, scale: float = 1.0):
        h = self.norm(self.embed(ids))
        h, _ = self.attn(h, h, h, need_weights=False)
        h = torch.nn.functional.gelu(h) * scale
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return {"logits": self.head(h.mean(1)), "hidden": h}


def test_torch_model_runs_in_onnxruntime_with_its_call_structure():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    ids, mask = torch.randint(0, 20, (2, 7)), torch.ones(2, 7)
    om = graphopt.optimize(model, ["dce"], ((ids,), {"mask": mask}), backend="onnxruntime",
                           backend_options={"threads": 1, "optimization_level": "all"})
    onnx.checker.check_model(om.executable.model, full_check=True)
    assert [o.name for o in om.executable.model.graph.output] == ["logits", "hidden"]
    for batch in (3, 5):
        ids, mask = torch.randint(0, 20, (batch, 7)), (torch.rand(batch, 7) > 0.3).float()
        got = om(ids, mask=mask)
        with torch.no_grad():
            expected = model(ids, mask=mask)
        assert set(got) == {"logits", "hidden"}
        for key in got:
            assert (got[key] - expected[key]).abs().max().item() < 1e-4


def test_save_writes_onnx_atomically(tmp_path):
    model = TwoHeads().eval()
    ids = torch.randint(0, 20, (2, 7))
    om = graphopt.optimize(model, [], (ids,))
    path = tmp_path / "model.onnx"
    om.save(str(path))
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {session.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        assert np.abs(logits - model(ids)["logits"].numpy()).max() < 1e-4
    first = path.read_bytes()
    om.save(str(path))
    assert path.read_bytes() == first  # deterministic


def test_external_data_output(tmp_path):
    g = Graph("big")
    x = g.add_input("x", TensorType(f32, (B, 64)))
    g.set_outputs([g.op.linear(x, g.add_constant(torch.randn(32, 64)))])
    path = tmp_path / "out.onnx"
    written = write_model(to_onnx(g), str(path), external_data=True)
    assert [os.path.basename(p) for p in written] == ["out.onnx", "out.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    umask = os.umask(0)
    os.umask(umask)
    assert {os.stat(p).st_mode & 0o777 for p in written} == {0o644 & ~umask}  # as a plain open gives both
    back = from_onnx(str(path))
    xin = torch.randn(2, 64)
    assert torch.allclose(run(back, xin)[0], run(g, xin)[0], atol=1e-5)
    assert create_session(str(path)).run(None, {"x": xin.numpy()})[0].shape == (2, 32)


# ---- options and errors -------------------------------------------------------------------------
def test_session_options_and_providers():
    g = single("relu")
    assert default_providers()[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in default_providers()) == ("CUDAExecutionProvider" in ort.get_available_providers())
    for level in ("disable", "basic", "extended", "all"):
        ex = graphopt.backends.registry.lower(g, "onnxruntime", threads=1, optimization_level=level, providers="cpu")
        assert ex.session.get_providers() == ["CPUExecutionProvider"]
        assert ex(X)[0].shape == X.shape
    with pytest.raises(ValueError, match="optimization_level"):
        OnnxRuntimeExecutable(g, optimization_level="fast")
    with pytest.raises(ValueError, match="not available"):
        OnnxRuntimeExecutable(g, providers=["NoSuchExecutionProvider"])
    with pytest.raises(TypeError, match="unknown onnxruntime backend options"):
        graphopt.backends.registry.lower(g, "onnxruntime", thread=2)


def test_aten_opaque_without_lowering_is_a_clear_error():
    class Flip(torch.nn.Module):
        def forward(self, x):
            return torch.flip(x, dims=[1]) + 1

    om = graphopt.optimize(Flip(), [], (torch.randn(2, 3),))
    opaque = om.graph.find_nodes("opaque")
    assert opaque, om.graph.op_counts()
    with pytest.raises(LoweringError, match=r"no ONNX lowering takes node %\S+ \(opaque\): .*no ONNX lowering for "
                                            r"aten::flip.*register_aten_lowering"):
        to_onnx(om.graph)


@register_op("test_onnx.swish", inputs=["x"], infer=same_as_input)
def _swish(x):
    return x * torch.sigmoid(x)


register_op("test_onnx.unlowered", inputs=["x"], infer=same_as_input)(torch.relu)


@register_lowering("test_onnx.swish")
def _swish_onnx(em, node):
    x = em.input(node, 0)
    return em.one("Mul", [x, em.one("Sigmoid", [x])], em.out(node))


def test_plugin_ops_lower_through_registered_lowerings():
    g = Graph("plugin")
    x = g.add_input("x", TensorType(f32, (B, 4)))
    g.set_outputs([g.op("test_onnx.swish", x)])
    assert_backends_agree(g, [torch.randn(3, 4)])
    g2 = Graph("unlowered")
    y = g2.add_input("x", TensorType(f32, (B, 4)))
    g2.set_outputs([g2.op("test_onnx.unlowered", y)])
    with pytest.raises(LoweringError, match="no ONNX lowering for IR op 'test_onnx.unlowered'.*register_lowering"):
        to_onnx(g2)
    with pytest.raises(RegistryError, match="already registered"):
        register_lowering("test_onnx.swish")(_swish_onnx)


def test_a_kernel_that_refuses_a_node_names_the_node_and_its_reason():
    g = Graph("sdpa")
    head = symbol("head")
    q, k, v = (g.add_input(name, TensorType(f32, (B, 2, 5, head))) for name in "qkv")
    g.set_outputs([g.op.sdpa(q, k, v)])
    with pytest.raises(LoweringError, match=r"no ONNX lowering takes node %\S+ \(sdpa\): .*a symbolic head size head "
                                            "needs an explicit scale"):
        to_onnx(g)


def test_emission_is_deterministic():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    graph = graphopt.optimize(model, [], (torch.randint(0, 20, (2, 7)),)).graph
    assert model_bytes(to_onnx(graph)) == model_bytes(to_onnx(graph.clone()))


@pytest.mark.parametrize("fixture", ["tiny_vit_case", "bert_case", "clip_case"])
def test_zoo_models_run_in_onnxruntime(fixture, request):
    import torch.utils._pytree as pytree

    case = request.getfixturevalue(fixture)
    om = graphopt.optimize(case.model, ["constant_folding", "cse", "dce"], (tuple(case.args), dict(case.kwargs)),
                           backend="onnxruntime")
    onnx.checker.check_model(om.executable.model, full_check=True)

    def grow(v):
        return torch.cat([v, v[:1]]) if isinstance(v, torch.Tensor) else v

    args, kwargs = [grow(a) for a in case.args], {k: grow(v) for k, v in case.kwargs.items()}
    got = om(*args, **kwargs)
    with torch.no_grad():
        expected = case.model(*args, **kwargs)
    assert type(got) is type(expected)
    for g, e in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected)):
        if isinstance(e, torch.Tensor):
            assert g.shape == e.shape and (g - e).abs().max().item() <= 1e-4


def test_declared_intermediate_types_are_valid():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    graph = graphopt.optimize(model, [], (torch.randint(0, 20, (2, 7)),)).graph
    plain, declared = to_onnx(graph), to_onnx(graph, value_info=True)
    assert len(plain.graph.value_info) == 0 and len(declared.graph.value_info) > 10
    onnx.checker.check_model(declared, full_check=True)
    ids = torch.randint(0, 20, (3, 7)).numpy()
    a = create_session(plain).run(None, {"ids": ids})
    b = create_session(declared).run(None, {"ids": ids})
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
