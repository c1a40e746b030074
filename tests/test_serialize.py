"""IR files: every graph kind round-trips exactly, and loading never runs code from the file
(pickles are refused unread, a tampered header names the file, the allow-list holds)."""
import json
import math
import os
import pickle
import random
import struct
import warnings

import numpy as np
import pytest
import sympy
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.backends.torch_backend import run
from graphopt.frontends import from_onnx, from_torch
from graphopt.ir import Graph, TensorType, assert_structurally_equal
from graphopt.ir.ops.opaque import TensorArg
from graphopt.ir.serialize import IRFileError, load_graph, save_graph
from graphopt.ir.types import symbol
from graphopt.passes import PassManager


def round_trip(graph: Graph, tmp_path) -> Graph:
    path = tmp_path / "g.graphopt"
    save_graph(graph, str(path))
    loaded = load_graph(str(path))
    assert_identical(loaded, graph)
    return loaded


def assert_identical(loaded: Graph, graph: Graph):
    assert str(loaded) == str(graph)
    assert_structurally_equal(loaded, graph)
    assert loaded.name == graph.name and loaded.meta == graph.meta
    assert [(v.name, v.type) for v in loaded.inputs] == [(v.name, v.type) for v in graph.inputs]
    assert [v.name for v in loaded.outputs] == [v.name for v in graph.outputs]
    for a, b in zip(loaded.nodes, graph.nodes, strict=True):
        assert a.op == b.op and [v.type for v in a.outputs] == [v.type for v in b.outputs]
        assert same(a.attrs, b.attrs) and same(a.meta, b.meta), a.label()
    assert list(loaded.constants) == list(graph.constants)
    for name, value in graph.constants.items():
        got = loaded.constants[name].const
        assert got.dtype == value.const.dtype and torch.equal(got, value.const), name


def same(a, b) -> bool:
    """Equal values of the same types all the way down (NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


# ---- round trips -----------------------------------------------------------------------------
def test_every_attribute_kind_and_dtype_round_trips(tmp_path):
    """A hand-built graph with symbolic dims, constants of every dtype and an opaque node whose
    argument template holds each kind of attribute value an ATen op can take."""
    b, t = symbol("batch"), symbol("tokens")
    g = Graph("kinds")
    x = g.add_input("x", TensorType(torch.float32, (b, 2 * t + 1, 4)))
    ids = g.add_input("ids", TensorType(torch.int64, (b, sympy.floor(t / 2))))
    consts = {dtype: g.add_constant(torch.arange(6).reshape(2, 3).to(dtype), f"c_{str(dtype)[6:]}")
              for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                            torch.int16, torch.int8, torch.uint8, torch.bool)}
    g.add_constant(torch.tensor(-0.0), "scalar")
    g.add_constant(torch.empty(0, 3), "empty")
    shared = torch.randn(4, 4)
    g.add_constant(shared, "w")
    g.add_constant(shared[1:], "w_view")  # shares storage with w
    args = (TensorArg(0), [1, -2, 3], (1.5, float("inf"), -float("inf"), 1e-300), "reflect", None, True,
            torch.int8, torch.device("cpu"), torch.contiguous_format, torch.strided,
            ((1, (2, ("deep", None))), []), {"k": 1, 2: "v"}, sympy.Max(b, 2) + sympy.Mod(t, 3),
            sympy.ceiling(b / 3) * t ** 2, sympy.Rational(1, 3) * b, b"\x00\xff")
    out_types = (TensorType(torch.float32, (b, 2 * t + 1, 4)),)
    y = g.create_node("opaque", [x, ids], {"target": "aten::relu.default", "args": args,
                                           "kwargs": {"alpha": float("nan")}, "out_types": out_types},
                      meta={"module": "m.layer", "why": ("a", 1, 2.5, None)}).output
    z = g.op.softmax(y, dim=-1)
    g.set_outputs([z, consts[torch.bool]])
    g.meta = {"symbols": ["batch", "tokens"], "scale": 0.1, "nested": {"a": [1, (2, 3)]}}
    loaded = round_trip(g, tmp_path)
    node = loaded.find_nodes("opaque")[0]
    assert math.isnan(node.attrs["kwargs"]["alpha"])
    assert math.copysign(1, loaded.constants["scalar"].const.item()) == -1
    assert node.attrs["args"][11] == {"k": 1, 2: "v"} and node.attrs["args"][15] == b"\x00\xff"


@pytest.fixture(scope="module")
def tiny_vit_graph(tiny_vit_case):
    return from_torch(tiny_vit_case.model, tiny_vit_case.args)


@pytest.mark.parametrize("pipeline", [[], ["integer_only"], ["fuse_gelu", "low_rank", "fuse_low_rank"]])
def test_zoo_tiny_vit_graphs_round_trip_and_run(tiny_vit_case, tiny_vit_graph, pipeline, tmp_path):
    x = tiny_vit_case.args[0]
    graph, _ = PassManager(pipeline, calibration=[(x,)]).run(tiny_vit_graph)
    loaded = round_trip(graph, tmp_path)
    assert torch.equal(graphopt.OptimizedModel(loaded, None, "torch")(x), graphopt.OptimizedModel(graph, None, "torch")(x))


def test_token_merged_hf_graph_round_trips(tmp_path):
    """Token-merge ops, a keyword-input in_spec and a transformers ModelOutput out_spec."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, image_size=16, patch_size=4)).eval()
    x = torch.randn(2, 3, 16, 16)
    graph, _ = PassManager(["token_merge:r=2"]).run(from_torch(model, (), {"pixel_values": x}))
    assert graph.find_nodes("token_merge")
    loaded = round_trip(graph, tmp_path)
    out = graphopt.OptimizedModel(loaded, None, "torch")(pixel_values=x)
    assert type(out) is type(model(x))
    assert torch.equal(out.logits, run(graph, x)[0])


def test_onnx_imported_graph_with_opaque_nodes_round_trips(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    outs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("indices", TensorProto.INT64, None),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])]
    then_g = helper.make_graph([helper.make_node("Add", ["x", "bias"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 8])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "bias"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", 8])])
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [numpy_helper.from_array(np.array([3], np.int64), "k"),
             numpy_helper.from_array(np.ones(8, np.float32), "bias")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, cond], outs, inits),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    graph = from_onnx(model)
    assert {n.attrs["op_type"] for n in graph.find_nodes("onnx_opaque")} == {"TopK", "If"}
    loaded = round_trip(graph, tmp_path)
    feeds = (torch.randn(3, 8), torch.tensor(True))
    for a, b in zip(run(loaded, *feeds), run(graph, *feeds), strict=True):
        assert torch.equal(a, b)


# ---- hostile and broken files ---------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def _saved_graph(tmp_path) -> str:
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (symbol("batch"), 4)))
    g.set_outputs([g.op.relu(x)])
    path = str(tmp_path / "good.graphopt")
    save_graph(g, path)
    return path


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_payload_is_never_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "graphopt.ir/1", "name": _Payload(str(marker))}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, str(path))
    with pytest.raises(IRFileError, match=f"{path}.*does not load pickles"):
        load_graph(str(path))
    assert not marker.exists()


def test_loading_never_unpickles_anything(tmp_path, monkeypatch):
    """No pickle machinery is reachable from load_graph: every entry point is a tripwire."""
    path = _saved_graph(tmp_path)

    def tripwire(*args, **kwargs):
        raise AssertionError("load_graph reached pickle")

    class TrippedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            raise AssertionError(f"find_class({module}, {name})")

    monkeypatch.setattr(pickle, "Unpickler", TrippedUnpickler)
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, tripwire)
    monkeypatch.setattr(torch, "load", tripwire)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no FutureWarning (or any other) on the way
        assert str(load_graph(path)).count("relu") == 1


def _rewrite_header(path: str, edit) -> None:
    """Rewrite the JSON structure in a saved file's safetensors header (what an attacker controls)."""
    data = open(path, "rb").read()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    structure = json.loads(header["__metadata__"]["graphopt"])
    edit(structure)
    header["__metadata__"]["graphopt"] = json.dumps(structure)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + size:])


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["nodes"][0].__setitem__(4, ["dict", [["module", ["pickle", "gASVAAAA"]]]]), "unknown or malformed"),
    (lambda s: s["nodes"][0].__setitem__(4, ["dict", [["m", ["torch", "load"]]]]), "not a dtype"),
    (lambda s: s["inputs"][0][1][2].__setitem__(0, ["dim", ["factorial", [10 ** 6]]]), "bad dim expression"),
    (lambda s: s["inputs"][0][1][2].__setitem__(0, ["dim", ["Pow", [10, 10 ** 9]]]), "small rational exponent"),
    (lambda s: s["meta"].__setitem__(1, [["x", ["treespec", ["os.system", None, []]]]]), "not registered"),
    (lambda s: s["nodes"][0].__setitem__(1, ["nowhere"]), "used before it is defined"),
    (lambda s: s["nodes"][0].__setitem__(0, "no_such_op"), "unknown op"),
    (lambda s: s.__setitem__("format", "graphopt.ir/999"), "no graphopt.ir/2 structure"),
])
def test_tampered_structure_is_refused_naming_the_file(tmp_path, edit, message):
    path = _saved_graph(tmp_path)
    _rewrite_header(path, edit)
    with pytest.raises(IRFileError, match=f"{path}.*{message}"):
        load_graph(path)


def test_a_dim_string_is_never_handed_to_sympify(tmp_path):
    """sympify evaluates Python: a string where a dim belongs must be refused, not parsed."""
    marker = tmp_path / "pwned"
    path = _saved_graph(tmp_path)
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch() or 1"
    _rewrite_header(path, lambda s: s["inputs"][0][1][2].__setitem__(0, payload))
    with pytest.raises(IRFileError, match="not an integer or a dim expression"):
        load_graph(path)
    assert not marker.exists()
    huge = ["Add", [f"s{i}" for i in range(500)]]
    _rewrite_header(path, lambda s: s["inputs"][0][1][2].__setitem__(0, ["dim", huge]))
    with pytest.raises(IRFileError, match="dim expression is too large"):
        load_graph(path)


@pytest.mark.parametrize("target, message", [
    ("load_library::__call__.__call__", "not an operator name"),  # would dlopen any path when the graph runs
    ("aten::no_such_op.default", "not available in this torch build"),
    ("aten::relu.overloads", "not a torch operator"),  # a method of the overload packet
])
def test_opaque_targets_must_be_torch_operators(tmp_path, target, message):
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (2,)))
    g.set_outputs([g.create_node("opaque", [x], {"target": "aten::relu.default", "args": (TensorArg(0),),
                                                 "out_types": (x.type,)}).output])
    path = str(tmp_path / "opaque.graphopt")
    save_graph(g, path)
    assert torch.equal(run(load_graph(path), -torch.ones(2))[0], torch.zeros(2))

    def retarget(s):
        s["nodes"][0][2][1][0][1] = target  # attrs: ["dict", [["target", ...], ...]]
    _rewrite_header(path, retarget)
    with pytest.raises(IRFileError, match=f"{path}.*{message}"):
        load_graph(path)


def test_truncated_random_and_special_files_are_refused(tmp_path):
    good = open(_saved_graph(tmp_path), "rb").read()
    cases = {"truncated": good[:len(good) // 2], "cut": good[:-4], "random": random.Random(0).randbytes(4096),
             "empty": b"", "huge_header": struct.pack("<Q", 2 ** 62) + b"{}", "text": b"hello, world"}
    for name, data in cases.items():
        path = tmp_path / f"{name}.graphopt"
        path.write_bytes(data)
        with pytest.raises(IRFileError, match=str(path)):
            load_graph(str(path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(IRFileError, match=f"{fifo} is not a regular file"):
        load_graph(str(fifo))  # would block forever if opened
    with pytest.raises(IRFileError, match="cannot read"):
        load_graph(str(tmp_path / "missing.graphopt"))


def test_mutated_files_load_or_are_refused_cleanly(tmp_path):
    """A seeded mutator over a saved graph with symbolic dims, attributes and constants: every
    mutant either loads (a valid graph) or raises IRFileError, nothing else."""
    g = Graph("m")
    x = g.add_input("x", TensorType(torch.float32, (symbol("batch"), 2 * symbol("tokens"), 4)))
    w = g.add_constant(torch.randn(4, 4), "w")
    y = g.op.linear(x, w, None)
    g.set_outputs([g.op.softmax(g.op.reshape(y, shape=(symbol("batch"), -1)), dim=-1)])
    path = tmp_path / "good.graphopt"
    save_graph(g, str(path))
    good = path.read_bytes()
    rng = random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(300):
        data = bytearray(good)
        for _ in range(rng.choice([1, 2, 8])):
            at = rng.randrange(len(data))
            data[at] = rng.choice([rng.randrange(256), ord("["), ord("]"), ord('"'), ord("0"), ord("-")])
        mutant = tmp_path / f"mutant{i}.graphopt"
        mutant.write_bytes(bytes(data))
        try:
            load_graph(str(mutant))
            outcomes["loaded"] += 1
        except IRFileError as e:
            assert str(mutant) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100, outcomes
