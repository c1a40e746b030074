"""The text IR: Graph.parse reads what print(graph) writes (zoo models, an optimized graph, a
hand-written graph with every attribute kind), and names the line, column and expectation on errors."""
import math

import pytest
import torch

from graphopt.frontends import from_torch
from graphopt.ir import Graph, TensorType, assert_structurally_equal, verify
from graphopt.ir.interpreter import run
from graphopt.ir.parser import ParseError
from graphopt.ir.printer import INLINE_LIMIT
from graphopt.passes import PassManager
from graphopt.pipeline import _flat_tensors

ZOO = ["tiny_vit_case", "bert_case", "gpt2_case"]  # a vision encoder, a masked text encoder, a causal decoder


def named_constants(graph):
    """The tensors the text names but does not print: constants over the inline limit."""
    return {name: v.const for name, v in graph.constants.items() if v.const.numel() > INLINE_LIMIT}


def assert_round_trips(graph, inputs):
    text = str(graph)
    parsed = Graph.parse(text, constants=named_constants(graph))
    assert str(parsed) == text
    assert_structurally_equal(parsed, graph)
    verify(parsed)
    for got, want in zip(run(parsed, *inputs), run(graph, *inputs), strict=True):
        assert torch.equal(got, want)
    return parsed


@pytest.mark.parametrize("fixture", ZOO)
def test_zoo_models_round_trip(fixture, request):
    case = request.getfixturevalue(fixture)
    graph = from_torch(case.model, tuple(case.args), dict(case.kwargs), dynamic_batch=bool(case.dynamic_batch))
    assert_round_trips(graph, _flat_tensors(graph, tuple(case.args), dict(case.kwargs)))


def test_optimized_graph_round_trips_with_inline_constants(tiny_vit_case):
    """decompose_attention adds the scale constant and folding adds small folded constants: they print inline."""
    case = tiny_vit_case
    graph = from_torch(case.model, tuple(case.args), dict(case.kwargs))
    graph, _ = PassManager(["decompose_attention", "constant_folding", "cse", "dce"]).run(graph)
    assert "constant(0.25)" in str(graph)  # 1/sqrt(head size 16)
    assert_round_trips(graph, _flat_tensors(graph, tuple(case.args), dict(case.kwargs)))


def test_integer_only_graph_round_trips_bit_exactly(tiny_vit_case):
    """int.* ops: requantization attributes, string dtypes, int8 / int32 constants."""
    case = tiny_vit_case
    graph = from_torch(case.model, tuple(case.args), dict(case.kwargs))
    calibration = [(torch.randn_like(case.args[0]),) for _ in range(2)]
    graph, _ = PassManager(["integer_only"], calibration=calibration).run(graph)
    assert "int.requant" in graph.op_counts()
    assert_round_trips(graph, list(case.args))


HANDWRITTEN = """\
graph "hand written"(%x: f32[batch,tokens,8], %mask: bool[batch,1,1,tokens]) {
  %w: f32[8,8] = constant
  %b: f32[8] = constant([0.5,-1.0,1e-05,0.1,2.0,3.0,4.0,-0.0])
  %neg_inf: f32[] = constant(-inf)
  %h16: f16[2] = constant([0.5,0.099975586])
  %bf: bf16[1,2] = constant([[0.5,3.140625]])
  %ids: i64[3] = constant([0,-7,9223372036854775807])
  %flags: bool[2] = constant([True,False])
  %empty: f32[0,3] = constant([])
  %"onnx::MatMul_1": f32[batch,tokens,8] = linear(%x, %w, %b)
  %1: f32[batch,tokens,2,4] = reshape(%"onnx::MatMul_1", shape=[batch,tokens,2,4])
  %q: f32[batch,2,tokens,4] = permute(%1, dims=[0,2,1,3])
  %kt: f32[batch,2,4,tokens] = permute(%q, dims=[0,1,3,2])
  %scores: f32[batch,2,tokens,tokens] = matmul(%q, %kt)
  %masked: f32[batch,2,tokens,tokens] = where(%mask, %scores, %neg_inf)
  %attn: f32[batch,2,tokens,4] = sdpa(%q, %q, %q, %mask, is_causal=False, scale=None)
  %flat: f32[batch*tokens,8] = reshape(%"onnx::MatMul_1", shape=[batch*tokens,8])
  %half: f32[batch,tokens-1,8] = slice(%x, dim=1, start=1, end=9223372036854775807, step=1)
  %g: f32[batch,tokens,8] = gelu(%x, approximate="tanh")
  %n: f32[batch,tokens,8] = layer_norm(%g, None, %b, normalized_shape=[8], eps=1e-05)
  %c: f32[batch,tokens,8] = clamp(%n, min=None, max=6.0)
  %d: f32[batch,tokens,8] = div(%c, %x, rounding_mode="floor")
  %i: f16[batch,tokens,8] = cast(%d, dtype=f16)
  %r: i64[tokens] = arange(start=0, end=tokens, step=1, dtype=i64)
  %a0: f32[batch,tokens,4], %a1: f32[batch,tokens,4] = opaque(%1, target="aten::unbind.int", args=[$0,2], kwargs={}, out_types=[f32[batch,tokens,4],f32[batch,tokens,4]])
  %s: f32[batch,1,8] = sum(%x, dims=[1], keepdim=True, dtype=None)
  return %masked, %attn, %flat, %half, %i, %r, %a1, %s, %h16, %bf, %ids, %flags, %empty
}"""


def test_handwritten_graph_round_trips_with_every_attribute_kind():
    w = torch.randn(8, 8)
    graph = Graph.parse(HANDWRITTEN, constants={"w": w})
    assert graph.name == "hand written"
    assert graph.constants["w"].const is w  # named tensors are used, not copied
    assert graph.constants["neg_inf"].const.item() == -math.inf
    assert graph.constants["h16"].const.dtype == torch.float16
    assert torch.equal(graph.constants["bf"].const, torch.tensor([[0.5, 3.140625]], dtype=torch.bfloat16))
    assert graph.constants["ids"].const.tolist() == [0, -7, 2 ** 63 - 1]
    assert math.copysign(1, graph.constants["b"].const[-1].item()) == -1  # -0.0 keeps its sign
    assert graph.outputs[2].type.shape[0] == graph.inputs[0].type.shape[0] * graph.inputs[0].type.shape[1]
    unbind = graph.find_nodes("opaque")[0]
    assert unbind.attrs["args"][1] == 2 and unbind.attrs["kwargs"] == {}
    x, mask = torch.randn(3, 5, 8), torch.rand(3, 1, 1, 5) > 0.3
    assert_round_trips(graph, [x, mask])
    outs = run(graph, x, mask)
    h = torch.nn.functional.linear(x, w, graph.constants["b"].const)
    q = h.reshape(3, 5, 2, 4).permute(0, 2, 1, 3)
    torch.testing.assert_close(outs[1], torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask))
    torch.testing.assert_close(outs[4], torch.div(torch.clamp(torch.nn.functional.layer_norm(
        torch.nn.functional.gelu(x, approximate="tanh"), [8], None, graph.constants["b"].const), max=6.0), x,
        rounding_mode="floor").half())


def test_comments_blank_lines_and_optional_trailing_none_are_accepted():
    text = """
    # a comment line
    graph main(%x: f32[4]) {   # trailing comment

      %0: f32[4] = relu(%x)
      return %0
    }
    """
    graph = Graph.parse(text)
    assert graph.op_counts() == {"relu": 1}
    assert str(graph) == "graph main(%x: f32[4]) {\n  %0: f32[4] = relu(%x)\n  return %0\n}"


def test_symbolic_dim_expressions_keep_their_meaning():
    graph = Graph.parse("""graph main(%x: f32[batch,tokens]) {
      %0: f32[batch*tokens] = reshape(%x, shape=[batch*tokens])
      %1: f32[floor(batch*tokens/2)] = slice(%0, dim=0, start=0, end=floor(batch*tokens/2), step=1)
      return %1
    }""")
    out = run(graph, torch.arange(15.0).reshape(3, 5))[0]
    assert out.tolist() == list(range(7))
    assert str(Graph.parse(str(graph))) == str(graph)


@pytest.mark.parametrize("text,constants,message", [
    ("graph main(%x: f32[4]) {\n  %0: f32[4] = rleu(%x)\n  return %0\n}", None,
     r"line 2, column 16: unknown op 'rleu'.*did you mean.*relu"),
    ("graph main(%x: f32[4]) {\n  %0: f32[4] = relu(%y)\n  return %0\n}", None,
     r"line 2, column 21: %y is used before it is defined"),
    ("graph main(%x: f32[4]) {\n  %0: f32[5] = relu(%x)\n  return %0\n}", None,
     r"line 2, column 3: %0 is declared f32\[5\], but relu gives f32\[4\]"),
    ("graph main(%x: f32[4]) {\n  %0: f32[4] = relu(%x\n  return %0\n}", None,
     r"line 2, column 23: expected ',' or '\)' in the argument list, found a line break"),
    ("graph main(%x: f32[4]) {\n  %0: f32[4] = gelu(%x, approximate=tanh)\n  return %0\n}", None,
     r"line 2, column 37: gelu: attribute approximate is a string; write it in quotes: approximate=\"tanh\""),
    ("graph main(%x: f32[4]) {\n  %w: f32[4] = constant\n  return %w\n}", None,
     r"line 2, column 3: constant %w has no value: write it inline, constant\(\[...\]\), or pass it as constants="),
    ("graph main(%x: f32[4]) {\n  %w: f32[4] = constant\n  return %w\n}", {"w": torch.ones(5)},
     r"line 2, column 3: constants='w' is f32\[5\], but the text declares %w: f32\[4\]"),
    ("graph main(%x: f32[4]) {\n  %w: f32[2] = constant([1.0,2.0])\n  return %w\n}", {"w": torch.ones(2)},
     r"line 2, column 3: constant %w has a value in the text and in constants=; give it once"),
    ("graph main(%x: f32[4]) {\n  %w: f32[2] = constant([1.0,2.0,3.0])\n  return %w\n}", None,
     r"line 2, column 25: the literal has shape \[3\], but the type is f32\[2\]"),
    ("graph main(%x: f32[4]) {\n  return %x\n}", {"w": torch.ones(2)},
     r"line 1, column 1: constants= gives %w, which the text does not declare"),
    ("graph main(%x: f32[4]) {\n  %x: f32[4] = relu(%x)\n  return %x\n}", None,
     r"line 2, column 3: %x is defined twice"),
    ("graph main(%x: f32[4]) {\n  %0: f32[4] = relu(%x, dim=1)\n  return %0\n}", None,
     r"line 2, column 16: relu: op relu has no attribute \['dim'\]"),
    ("graph main(%x: q8[4]) {\n  return %x\n}", None, r"line 1, column 16: unknown dtype 'q8'"),
    ('graph main(%x: f32[4]) {\n  %0: f32[4] = gelu(%x, approximate="\\q")\n  return %0\n}', None,
     r'line 2, column 37: bad string "\\q": Invalid \\escape'),
    ("graph main(%x: f32[4]) {\n  %0: f32[4] = relu(%x) ?\n  return %0\n}", None,
     r"line 2, column 25: unexpected character '\?'"),
    ("graph main(%x: f32[4]) {\n  %0: f32[4] = relu(%x)\n", None,
     r"line 3, column 1: expected a node, a constant or 'return', found the end of the text"),
    ("graph main(%x: f32[4]) {\n  %0: f32[4] = relu(%x, dim=" + "[" * 100000 + ")\n  return %0\n}", None,
     r"line 2, column \d+: brackets or parentheses nest too deeply"),
    ("graph main(%x: f32[n]) {\n  %0: f32[n] = reshape(%x, shape=[n**100])\n  return %0\n}", None,
     r"line 2, column 38: a dim power needs a small rational exponent, got 100"),
])
def test_errors_name_the_line_column_and_what_was_expected(text, constants, message):
    with pytest.raises(ParseError, match=message) as info:
        Graph.parse(text, constants=constants)
    line = text.splitlines()[info.value.line - 1] if info.value.line <= len(text.splitlines()) else ""
    if 0 < len(line) <= 120:  # the line, and a caret under the column
        assert str(info.value).endswith(f"\n  {line}\n  {' ' * (info.value.column - 1)}^")
    assert len(str(info.value)) < 600


def test_named_constant_tensors_are_not_overwritten():
    w = torch.ones(2)
    graph = Graph.parse("graph main() {\n  %w: f32[2] = constant\n  return %w\n}", constants={"w": w})
    assert graph.constants["w"].const is w and w.tolist() == [1.0, 1.0]
    assert graph.inputs == [] and graph.outputs[0].type == TensorType(torch.float32, (2,))


def onnx_model(with_topk: bool):
    """ONNX value names are not identifiers ('onnx::MatMul_0', '/block/Add_output_0'): the text quotes them."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_0"], ["/block/MatMul_output_0"]),
             helper.make_node("Relu", ["/block/MatMul_output_0"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    if with_topk:
        nodes.append(helper.make_node("TopK", ["y", "k"], ["values", "indices"], axis=1))
        outputs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["N", 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])], outputs,
                              [numpy_helper.from_array(torch.randn(3, 4).numpy(), "onnx::MatMul_0"),
                               numpy_helper.from_array(torch.tensor([2]).numpy(), "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8).SerializeToString()


def test_onnx_import_round_trips_and_onnx_opaque_nodes_are_refused_by_name():
    from graphopt.frontends import from_onnx

    graph = from_onnx(onnx_model(with_topk=False))
    assert '%"onnx::MatMul_0' in str(graph)  # quoted, a small weight inline
    assert_round_trips(graph, [torch.randn(5, 3)])
    opaque = from_onnx(onnx_model(with_topk=True))
    assert "onnx_opaque" in opaque.op_counts()
    with pytest.raises(ParseError, match=r"column \d+: onnx_opaque nodes are printed for reading only.*from_onnx"):
        Graph.parse(str(opaque))
