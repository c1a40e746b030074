"""IR core: types with symbolic dims, editing helpers, the verifier, the text form, the op registry."""
import pytest
import sympy
import torch

from graphopt.ir import (Attr, Graph, GraphError, OpError, TensorType, VerificationError, assert_structurally_equal,
                         get_op, register_op, same_as_input, structural_diff, verify)
from graphopt.ir.serialize import load_graph, save_graph

F32 = torch.float32


def linear_graph():
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 197, 384)))
    w = g.add_constant(torch.randn(384, 384), "w3")
    b = g.add_constant(torch.randn(384), "b3")
    y = g.op.linear(x, w, b)
    z = g.op.softmax(y, dim=-1)
    g.set_outputs([z])
    return g, x, y, z


def test_symbolic_types_infer_through_ops():
    g, x, y, z = linear_graph()
    batch = sympy.Symbol("batch", integer=True, positive=True)
    assert y.type.shape == (batch, 197, 384)
    flat = g.op.reshape(y, shape=(batch * 197, 384))
    assert str(flat.type) == "f32[197*batch,384]"
    with pytest.raises(OpError, match="reshape"):
        g.op.reshape(y, shape=(batch * 196, 384))
    back = g.op.reshape(flat, shape=(-1, 197, 384))
    assert back.type.matches(y.type)


def test_broadcast_and_promotion_follow_torch():
    g = Graph()
    a = g.add_input("a", TensorType(torch.float16, ("batch", 1, 64)))
    b = g.add_input("b", TensorType(torch.float32, (8, 64)))
    s = g.add_constant(torch.tensor(2.0, dtype=torch.float64))
    assert str(g.op.add(a, b).type) == "f32[batch,8,64]"
    assert g.op.mul(a, s).type.dtype == torch.float16  # 0-d tensors do not promote, as in torch
    assert torch.result_type(torch.ones(1, dtype=torch.float16), torch.tensor(2.0, dtype=torch.float64)) == torch.float16
    with pytest.raises(OpError, match="broadcast"):
        g.op.add(b, g.add_input("c", TensorType(F32, (7, 64))))


def test_text_form_is_one_line_per_node_and_stable():
    g, *_ = linear_graph()
    text = str(g)
    assert "%0: f32[batch,197,384] = linear(%x, %w3, %b3)" in text
    assert "%1: f32[batch,197,384] = softmax(%0, dim=-1)" in text
    assert text.splitlines()[0] == "graph main(%x: f32[batch,197,384]) {"
    assert str(linear_graph()[0]) == text


def test_editing_helpers_keep_graph_valid():
    g, x, y, z = linear_graph()
    with g.inserting_after(y.producer):
        r = g.op.relu(y)
    g.replace_all_uses_with(y, r)
    g.set_input(r.producer, 0, y)  # relu itself must still read y
    verify(g)
    assert [n.op for n in g.nodes] == ["linear", "relu", "softmax"]
    with pytest.raises(GraphError, match="still used"):
        g.erase_node(r.producer)
    g.replace_all_uses_with(r, y)
    g.erase_node(r.producer)
    verify(g)
    assert len(g) == 2


def test_replace_rejects_type_change():
    g, x, y, z = linear_graph()
    other = g.add_input("o", TensorType(F32, ("batch", 197, 10)))
    with pytest.raises(GraphError, match="cannot replace"):
        g.replace_all_uses_with(y, other)


def test_verifier_rejects_use_before_definition():
    g, x, y, z = linear_graph()
    g.move_before(z.producer, y.producer)
    with pytest.raises(VerificationError, match=r"node %1 \(softmax\): input 0 %0 is used before it is defined"):
        verify(g)
    g.topological_sort()
    verify(g)


def test_verifier_rejects_dangling_use_of_erased_node():
    g, x, y, z = linear_graph()
    node = y.producer
    g._unlink(node)  # a buggy pass that unlinks without rewiring
    with pytest.raises(VerificationError, match=r"node %1 \(softmax\).*%0 is produced by %0 \(linear\), which is not in the graph"):
        verify(g)


def test_verifier_rejects_orphan_constant_and_bad_types():
    g, x, y, z = linear_graph()
    orphan = g.add_constant(torch.ones(384))
    del g.constants[orphan.name]
    g.set_input(y.producer, 2, orphan)
    with pytest.raises(VerificationError, match="orphan constant"):
        verify(g)

    g, x, y, z = linear_graph()
    y.type = TensorType(F32, ("batch", 197, 385))
    with pytest.raises(VerificationError, match=r"node %0 \(linear\): output %0 is typed f32\[batch,197,385\]"):
        verify(g)


def test_verifier_rejects_inconsistent_use_lists_and_duplicate_names():
    g, x, y, z = linear_graph()
    y.uses.clear()
    with pytest.raises(VerificationError, match="does not list this node among its uses"):
        verify(g)
    g, x, y, z = linear_graph()
    z.name = y.name
    with pytest.raises(VerificationError, match="defined twice"):
        verify(g)


def test_register_op_from_a_plugin_and_refuse_clobbering():
    @register_op("test_plugin.swish", inputs=["x"], attrs={"beta": Attr("float", 1.0)}, infer=same_as_input)
    def swish(x, *, beta):
        return x * torch.sigmoid(beta * x)

    with pytest.raises(OpError, match="already registered"):
        register_op("test_plugin.swish", inputs=["x"], infer=same_as_input)(swish)
    g = Graph()
    x = g.add_input("x", TensorType(F32, (4,)))
    y = g.op("test_plugin.swish", x, beta=2.0)
    g.set_outputs([y])
    verify(g)
    from graphopt.backends.torch_backend import run
    t = torch.randn(4)
    torch.testing.assert_close(run(g, t)[0], t * torch.sigmoid(2 * t))
    with pytest.raises(OpError, match="attribute 'beta' must be float"):
        g.op("test_plugin.swish", x, beta="big")
    with pytest.raises(OpError, match="did you mean"):
        get_op("softmx")


def test_clone_shares_constants_and_is_independent():
    g, x, y, z = linear_graph()
    c = g.clone()
    assert c.constants["w3"].const is g.constants["w3"].const
    assert_structurally_equal(c, g)
    softmax = c.outputs[0].producer
    c.replace_all_uses_with(softmax.output, softmax.inputs[0], check_type=False)
    c.erase_node(softmax)
    verify(c)
    verify(g)
    assert (len(c), len(g)) == (1, 2)
    assert g.outputs[0].producer.op == "softmax"


def test_structural_comparison_finds_differences():
    g1, *_ = linear_graph()
    g2, *_ = linear_graph()
    g2.constants["w3"].const.copy_(g1.constants["w3"].const)
    g2.constants["b3"].const.copy_(g1.constants["b3"].const)
    assert_structurally_equal(g1, g2)
    last = g2.outputs[0].producer
    last.attrs["dim"] = 1
    assert "attributes" in structural_diff(g1, g2)


def test_to_networkx_has_every_node_and_edge():
    import networkx as nx
    g, *_ = linear_graph()
    nxg = g.to_networkx()
    assert nx.is_directed_acyclic_graph(nxg)
    assert nxg.number_of_edges() == 4
    assert [d["op"] for _, d in nxg.nodes(data=True) if d["kind"] == "op"] == ["linear", "softmax"]


def test_save_and_load_round_trip(tmp_path):
    g, *_ = linear_graph()
    path = tmp_path / "g.pt"
    save_graph(g, str(path))
    loaded = load_graph(str(path))
    assert str(loaded) == str(g)
    assert_structurally_equal(loaded, g)
