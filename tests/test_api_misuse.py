"""Misusing the Python API gets a clear error naming what is wrong, never a failure deep inside torch:
example inputs, calibration data, passes whose result does not run, passes that cannot compose."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
import graphopt.frontends
from graphopt.backends.torch_backend import run
from graphopt.ir import Graph, TensorType
from graphopt.ir.types import symbol
from graphopt.passes import PassError, PassManager, register_pass

F32 = torch.float32


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    return model, x, graphopt.optimize(model, [], (x,)).graph


# ---- example inputs --------------------------------------------------------------------------
@pytest.mark.parametrize("inputs, message", [
    ("abc", "example_inputs must be a tensor, a tuple or list .* got str"),
    (3, "example_inputs must be .* got int"),
    (("abc",), r"example_inputs\[0\] is a str \('abc'\); expected a torch.Tensor"),
    (((torch.ones(1), b"x"), {}), r"example_inputs\[1\] is a bytes"),
    ((np.array(["a", "b"], dtype=object),), r"example_inputs\[0\] is a numpy array of object"),
])
def test_example_inputs_of_the_wrong_kind_are_named(mlp, inputs, message):
    model, _, graph = mlp
    for target in (model, graph):
        with pytest.raises(TypeError, match=message):
            graphopt.optimize(target, ["cse"], inputs)


def test_numpy_example_inputs_are_taken_as_tensors(mlp):
    model, x, _ = mlp
    om = graphopt.optimize(model, ["cse"], (x.numpy(),), check=True)
    assert om.graph.inputs[0].type.dtype == F32
    assert torch.allclose(om(x), model(x), atol=1e-6)
    om = graphopt.optimize(model, ["cse"], {"input": x.numpy()})
    assert torch.allclose(om(input=x), model(x), atol=1e-6)


@pytest.mark.parametrize("inputs, message", [
    ((torch.randn(3, 5),), r"example_inputs: input %\w+ is \(3, 5\) torch.float32, the graph expects f32\[batch,8\] "
                           r"\(input 0 of 1\)"),
    ((torch.ones(3, 8, dtype=torch.long),), r"is \(3, 8\) torch.int64, the graph expects f32\[batch,8\] "
                                           r"\(input 0 of 1\): give it as torch.float32"),
    ((torch.randn(3, 8, 1),), r"is \(3, 8, 1\) torch.float32, the graph expects f32\[batch,8\]"),
    ((torch.randn(3, 8), torch.randn(3, 8)), r"example_inputs: the model was captured with 1 positional input\(s\), got 2"),
])
def test_example_inputs_that_do_not_fit_the_graph_are_named(mlp, inputs, message):
    _, _, graph = mlp
    with pytest.raises(ValueError, match=message):
        graphopt.optimize(graph, ["cse"], inputs)


def test_example_inputs_of_an_onnx_model_are_checked_by_input():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    z = helper.make_tensor_value_info("z", TensorProto.INT64, ["n"])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"]), helper.make_node("Identity", ["ids"], ["z"])], "g", [x, ids], [y, z],
        [numpy_helper.from_array(np.ones(4, np.float32), "b")]), opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    graph = graphopt.frontends.from_onnx(model)  # exported from graphopt.frontends
    assert [v.type for v in graph.inputs] == [TensorType(F32, ("n", 4)), TensorType(torch.int64, ("n",))]
    with pytest.raises(ValueError, match=r"input %ids is \(2,\) torch.float32, the graph expects i64\[n\] \(input 1 of 2\)"):
        graphopt.optimize(model, ["cse"], (torch.zeros(2, 4), torch.zeros(2)))
    with pytest.raises(ValueError, match="example_inputs has 1 tensors; the graph takes 2"):
        graphopt.optimize(model, ["cse"], (torch.zeros(2, 4),))
    om = graphopt.optimize(model, ["cse"], {"ids": np.arange(2), "x": np.zeros((2, 4), np.float32)}, check=True)
    assert torch.equal(om(torch.zeros(2, 4), torch.arange(2))[0], torch.ones(2, 4))


# ---- calibration data ------------------------------------------------------------------------
@pytest.mark.parametrize("value, problem", [
    (float("nan"), "contains NaN"), (float("inf"), "contains Inf"), (-float("inf"), "contains Inf"),
    (1e30, "has a value of magnitude 1e\\+30 .*too large to calibrate"),
])
@pytest.mark.parametrize("passes", [["integer_only"], ["low_rank"]])
def test_non_finite_or_huge_calibration_data_is_named(mlp, value, problem, passes):
    _, x, graph = mlp
    bad = x.clone()
    bad[2, 5] = value
    with pytest.raises(ValueError, match=rf"calibration item 1: input %\w+ {problem}") as info:
        graphopt.optimize(graph, passes, (x,), calibration=[(x,), (bad,), (x,)])
    assert "first at index (2, 5)" in str(info.value)


def test_large_but_finite_calibration_data_is_accepted(mlp):
    _, x, graph = mlp
    big = x * 1e15  # squares still fit float32
    om = graphopt.optimize(graph, ["integer_only"], (x,), calibration=[(x,), (big,)])
    assert torch.isfinite(om(big)).all()


def test_calibration_items_of_the_wrong_kind_are_named(mlp):
    _, x, graph = mlp
    with pytest.raises(ValueError, match=r"calibration item 1\[0\] is a str"):
        graphopt.optimize(graph, ["integer_only"], (x,), calibration=[(x,), ("x",)])
    om = graphopt.optimize(graph, ["integer_only"], (x,), calibration=[(x.numpy(),)])
    assert om.graph.find_nodes("int.linear") or om.graph.find_nodes("int.matmul")


# ---- the pass manager: results must run, nothing raw escapes ---------------------------------
@register_pass("test_api.select_out_of_range", tolerance=None)
def _select_out_of_range(graph, ctx):
    """Reads element 99 of axis 1 (which has 4): types check, running fails."""
    out = graph.outputs[0]
    with graph.inserting_after(out.producer):
        node = graph.create_node("opaque", [out], {"target": "aten::select.int", "args": (graph_arg(0), 1, 99),
                                                   "kwargs": None, "out_types": (out.type.with_shape(out.type.shape[:1]),)})
    graph.set_outputs([node.output])


def graph_arg(i):
    from graphopt.ir.ops.opaque import TensorArg
    return TensorArg(i)


def _ensures_raises(graph):
    raise KeyError("a broken postcondition hook")


@register_pass("test_api.broken_ensures", ensures=_ensures_raises)
def _noop(graph, ctx):
    """Does nothing; its postcondition hook crashes."""


@pytest.mark.parametrize("check", [False, True])
def test_a_result_that_fails_on_the_example_inputs_is_refused_naming_pass_and_node(mlp, check):
    _, x, graph = mlp
    before = str(graph)
    with pytest.raises(PassError, match=r"pass test_api.select_out_of_range: its result fails on the example inputs "
                                        r"at %\w+ \(opaque\): IndexError: .*99.*passes before it: cse") as info:
        graphopt.optimize(graph, ["cse", "test_api.select_out_of_range"], (x,), check=check)
    assert info.value.node is not None and info.value.node.op == "opaque"
    assert str(graph) == before


def test_without_example_inputs_the_result_is_not_run(mlp):
    _, x, graph = mlp
    out, _ = PassManager(["test_api.select_out_of_range"]).run(graph)
    with pytest.raises(IndexError):
        graphopt.OptimizedModel(out, None, "torch")(x)  # what the check above protects users from


def test_exceptions_from_pass_hooks_become_pass_errors(mlp):
    _, _, graph = mlp
    with pytest.raises(PassError, match="pass test_api.broken_ensures: raised KeyError: 'a broken postcondition hook'"):
        PassManager(["test_api.broken_ensures"]).run(graph)


def test_a_graph_that_does_not_run_on_its_example_inputs_is_named_before_any_pass():
    g = Graph()
    x = g.add_input("x", TensorType(F32, (symbol("batch"), 4)))
    g.set_outputs([g.create_node("opaque", [x], {"target": "aten::select.int", "args": (graph_arg(0), 1, 7),
                                                 "kwargs": None, "out_types": (TensorType(F32, (symbol("batch"),)),)}).output])
    with pytest.raises(ValueError, match=r"does not run on its example inputs \(at %\w+ \(opaque\)\): IndexError"):
        PassManager(["cse"], example_inputs=(torch.randn(2, 4),), check=True).run(g)


# ---- token_drop and token_merge do not compose -----------------------------------------------
@pytest.fixture(scope="module")
def vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                intermediate_size=64, image_size=16, patch_size=4)).eval()
    x = torch.randn(2, 3, 16, 16)
    return model, x, graphopt.frontends.from_torch(model, (x,))


@pytest.mark.parametrize("passes, refused, message, check", [
    (["token_drop:layer=0", "token_merge:r=2"], "token_merge:r=2", "already drops tokens", True),
    (["token_merge:r=2", "token_drop:layer=0"], "token_drop:layer=0", "already merges tokens", False),
])
def test_token_drop_and_token_merge_together_are_refused_at_pass_time(vit, passes, refused, message, check):
    """Either order used to return a model whose token indices ran past the merged token count."""
    model, x, graph = vit
    with pytest.raises(PassError, match=f"pass {refused}: does not apply: the graph {message}.*not both"):
        PassManager(passes, example_inputs=(x,), check=check).run(graph)
    alone, _ = PassManager(passes[:1], example_inputs=(x,)).run(graph)  # the first alone runs on the example input
    assert run(alone, x)[0].shape == (2, 2)


def test_a_misspelt_backend_option_names_the_ones_the_backend_takes(mlp):
    model, x, _ = mlp
    with pytest.raises(TypeError, match=r"unknown torch backend options \['threads'\]; it takes none"):
        graphopt.optimize(model, [], (x,), backend_options={"threads": 2})
    pytest.importorskip("onnxruntime")
    with pytest.raises(TypeError, match=r"unknown cpu_integer backend options \['thread'\]; it takes threads, replay"):
        graphopt.backends.registry.lower(graphopt.optimize(model, [], (x,)).graph, "cpu_integer", thread=2)


def test_save_picks_the_format_by_suffix_in_any_case(mlp, tmp_path):
    onnx = pytest.importorskip("onnx")
    model, x, _ = mlp
    om = graphopt.optimize(model, [], (x,))
    path = tmp_path / "model.ONNX"
    om.save(str(path))
    loaded = onnx.load(str(path))                 # an ONNX file, not graphopt's own format under an .ONNX name
    assert [i.name for i in loaded.graph.input] == [v.name for v in om.graph.inputs]


def test_save_never_writes_over_the_onnx_file_it_read(mlp, tmp_path):
    """The model's own file, by any spelling of its path, is refused and left as it was; another path saves."""
    pytest.importorskip("onnx")
    model, x, _ = mlp
    source = tmp_path / "model.onnx"
    graphopt.optimize(model, [], (x,)).save(str(source))
    original = source.read_bytes()
    om = graphopt.optimize(str(source), ["cse"], (x,))
    (tmp_path / "sub").mkdir()
    for spelling in (str(source), str(tmp_path / "sub" / ".." / "model.onnx"), source):
        with pytest.raises(FileExistsError, match="the ONNX file this model was read from"):
            om.save(spelling)
    assert source.read_bytes() == original
    om.save(str(tmp_path / "optimized.onnx"))
    assert (tmp_path / "optimized.onnx").stat().st_size > 0


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "cpu_integer"])
def test_every_backend_takes_inputs_the_same_way(mlp, backend):
    """A numpy array is the tensor it holds and a float64 tensor is cast to the float32 input, on every backend
    alike (they differed: numpy on ONNX Runtime only, float64 a raw ONNX Runtime error); an integer tensor for
    a float input is refused naming the input and the dtype to give."""
    if backend != "torch":
        pytest.importorskip("onnxruntime")
    model, x, _ = mlp
    calib = [(torch.randn(4, 8, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    om = graphopt.optimize(model, ["integer_only"], (x,), calibration=calib, backend=backend)
    want = om(x)
    assert torch.equal(om(x.numpy()), want) and torch.equal(om(x.double()), want)
    with pytest.raises(ValueError, match=r"input %\w+ is \(3, 8\) torch.int64, the graph expects f32\[batch,8\] "
                                         r"\(input 0 of 1\): give it as torch.float32"):
        om(torch.ones(3, 8, dtype=torch.long))


def test_token_ids_of_another_integer_dtype_are_cast_when_they_fit():
    from tests.tiny_models import padded_ids, tiny_bert

    model = tiny_bert(16, layers=1)
    ids, mask = padded_ids(torch.Generator().manual_seed(0), 2, 8)
    om = graphopt.optimize(model, [], ((), {"input_ids": ids, "attention_mask": mask}))
    want = om(input_ids=ids, attention_mask=mask).last_hidden_state
    got = om(input_ids=ids.int(), attention_mask=mask.bool()).last_hidden_state
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"input %\w+ is \(2, 8\) torch.uint64, the graph expects i64\[batch,8\] "
                                         r"\(input 0 of 2\): give it as torch.int64"):
        om(input_ids=ids.numpy().astype("uint64"), attention_mask=mask)


def test_calibration_of_another_float_width_is_cast_like_a_call(mlp):
    """float64 calibration batches calibrate the float32 graph (a call casts them too); a value float32 cannot
    hold is refused with its magnitude, before any cast."""
    model, x, graph = mlp
    calib = [(torch.randn(4, 8, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    want = graphopt.optimize(graph, ["integer_only"], (x,), calibration=calib)(x)
    got = graphopt.optimize(graph, ["integer_only"], (x.double(),), calibration=[(c.double(),) for (c,) in calib])(x)
    assert torch.equal(got, want)
    huge = calib[0][0].double()
    huge[1, 2] = 1e300
    with pytest.raises(ValueError, match=r"calibration item 0: input %\w+ has a value of magnitude 1e\+300"):
        graphopt.optimize(graph, ["integer_only"], (x,), calibration=[(huge,)])


def test_save_never_writes_over_the_weights_file_of_the_onnx_file_it_read(tmp_path):
    """A model whose weights are in a.onnx.data: saving onto that file (in any format), or to a.onnx whose large
    weights would go to a.onnx.data, is refused and the source still runs with its weights."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from graphopt.backends.onnxruntime_backend import save_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).eval()
    x = torch.randn(2, 64)
    save_onnx(graphopt.optimize(model, [], (x,)).graph, str(tmp_path / "a.onnx"), external_data=True)
    source = tmp_path / "b.onnx"                               # reads its weights from a.onnx.data
    source.write_bytes((tmp_path / "a.onnx").read_bytes())
    (tmp_path / "a.onnx").unlink()
    weights = tmp_path / "a.onnx.data"
    original = weights.read_bytes()
    om = graphopt.optimize(str(source), [], (x,))
    want = om(x)
    for target in (weights, tmp_path / "a.onnx"):
        with pytest.raises(FileExistsError, match=r"is a weights file \(.*a.onnx.data\) of the ONNX file"):
            om.save(str(target))
    assert weights.read_bytes() == original and not (tmp_path / "a.onnx").exists()
    assert torch.equal(graphopt.optimize(str(source), [], (x,))(x)[0], want[0])
    om.save(str(tmp_path / "copy.onnx"))
    assert len(onnx.load(str(tmp_path / "copy.onnx")).graph.initializer) == 2


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "cpu_integer"])
def test_token_ids_outside_the_vocabulary_and_empty_batches_are_refused_alike(backend):
    """Negative or too large ids are refused naming the input, the value and the table (ONNX Runtime's Gather
    wrapped negative ids into other logits; torch raised an IndexError); an empty batch too (each backend
    raised its own error)."""
    if backend != "torch":
        pytest.importorskip("onnxruntime")
    from tests.tiny_models import VOCAB, padded_ids, tiny_bert

    model = tiny_bert(16, layers=1)
    g = torch.Generator().manual_seed(0)
    ids, mask = padded_ids(g, 2, 8)
    om = graphopt.optimize(model, ["integer_only"], ((), {"input_ids": ids, "attention_mask": mask}),
                           calibration=[((), dict(zip(("input_ids", "attention_mask"), padded_ids(g, 2, 8))))],
                           backend=backend)
    for bad in (-1, VOCAB):
        wrong = ids.clone()
        wrong[1, 3] = bad
        with pytest.raises(ValueError, match=rf"input %input_ids holds {bad} at \[1, 3\]; it indexes a table of "
                                             rf"{VOCAB} rows, so its values must be in \[0, {VOCAB}\)"):
            om(input_ids=wrong, attention_mask=mask)
    with pytest.raises(ValueError, match=r"axis 0 \(batch\) is empty; give at least one item"):
        om(input_ids=ids[:0], attention_mask=mask[:0])
