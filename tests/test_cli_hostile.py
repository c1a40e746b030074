"""opt-cli on hostile and unusual files (issue 13): never write over an input, write nothing when the
command fails, one exit-2 line naming the file, tensor or node for malformed input, bounded time for
files that declare huge work (bounded memory: tests/test_cli_fuzz.py), ONNX Runtime crashes contained,
valid-but-unusual models (sparse initializers, broadcasting GELU constants) accepted."""
import json
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.passes import list_passes, register_pass

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def add_model(w: TensorProto):
    return model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [vi("x", F, [4])], [vi("y", F, [4])], [w])


def external(w: TensorProto, location: str, length: int) -> TensorProto:
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    return w


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ort_run(path_or_proto, feeds):
    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


# ---- files written vs files read ------------------------------------------------------------------
@pytest.fixture
def external_model(tmp_path):
    """model.onnx keeping its weight in weights.json (a name a report could have)."""
    w = external(numpy_helper.from_array(np.arange(4, dtype=np.float32), "w"), "weights.json", 16)
    (tmp_path / "weights.json").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    path = tmp_path / "model.onnx"
    path.write_bytes(add_model(w).SerializeToString())
    return path


def test_report_or_output_never_overwrites_the_inputs_weights(tmp_path, external_model, capsys):
    os.symlink(tmp_path / "weights.json", tmp_path / "alias.json")
    before = snapshot(tmp_path)
    for report in ("weights.json", "alias.json", "sub/../weights.json"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        code, _, err = cli(capsys, external_model, "--report", tmp_path / report, "--force")
        assert code == 2 and "the input model reads its weights from that file" in err, err
    code, _, err = cli(capsys, external_model, "-o", tmp_path / "weights.json.onnx", "--force", "--external-data")
    assert code == 0, err  # writes weights.json.onnx + weights.json.onnx.data: no input touched
    assert snapshot(tmp_path)["weights.json"] == before["weights.json"]
    for name in ("model.onnx", "weights.json"):
        assert (tmp_path / name).read_bytes() == before[name]


def test_output_whose_side_data_file_is_the_inputs_weights_is_refused(tmp_path, capsys):
    w = external(numpy_helper.from_array(np.ones(4, np.float32), "w"), "out.onnx.data", 16)
    (tmp_path / "out.onnx.data").write_bytes(np.ones(4, np.float32).tobytes())
    (tmp_path / "model.onnx").write_bytes(add_model(w).SerializeToString())
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, tmp_path / "model.onnx", "-o", tmp_path / "out.onnx", "--force", "--external-data")
    assert code == 2 and "reads its weights from that file" in err
    assert snapshot(tmp_path) == before


def test_external_data_never_replaces_an_existing_side_file_without_force(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(add_model(numpy_helper.from_array(np.ones(4, np.float32), "w")).SerializeToString())
    (tmp_path / "out.onnx.data").write_bytes(b"someone else's weights")
    code, _, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--external-data")
    assert code == 2 and "out.onnx.data already exists; pass --force" in err
    assert (tmp_path / "out.onnx.data").read_bytes() == b"someone else's weights"
    assert not (tmp_path / "out.onnx").exists()
    code, _, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--external-data", "--force", "-q")
    assert code == 0, err
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(ort_run(tmp_path / "out.onnx", {"x": x})[0], x + 1)


# ---- --check fails the command, and a failed command writes nothing -------------------------------
if "test_hostile.negate_outputs" not in list_passes():
    @register_pass("test_hostile.negate_outputs", tolerance=0.0)
    def _negate_outputs(graph, ctx) -> None:
        """Claims to be exact but negates every output (what --check must catch)."""
        graph.set_outputs([graph.op.neg(v) for v in graph.outputs])


def test_failing_check_exits_1_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(add_model(numpy_helper.from_array(np.ones(4, np.float32), "w")).SerializeToString())
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capsys, path, "-o", out, "--report", report, "-p", "test_hostile.negate_outputs",
                            "--check", "--runs", "1", "--warmup", "0")
    assert code == 1
    assert err.strip().splitlines() == [err.strip()] and "--check failed: max abs error" in err
    assert "cosine similarity -1.000000 < 0.999" in err and "nothing was written" in err
    assert "FAILED" in stdout  # the table's result row
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no output, no report, no temp files
    # the same run with limits that accept it writes both
    code, _, err = cli(capsys, path, "-o", out, "--report", report, "-p", "test_hostile.negate_outputs", "--check",
                       "--runs", "1", "--warmup", "0", "--atol", "100", "--min-cosine", "-1", "-q")
    assert code == 0, err
    check = json.loads(report.read_text())["check"]
    assert check["passed"] and check["cosine"] == pytest.approx(-1.0)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "out.onnx", "r.json"]


def test_failing_report_writes_nothing(tmp_path, capsys, monkeypatch):
    import graphopt.cli.report

    def disk_full(path, summary):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(graphopt.cli.report, "write_report", disk_full)
    path = tmp_path / "model.onnx"
    path.write_bytes(add_model(numpy_helper.from_array(np.ones(4, np.float32), "w")).SerializeToString())
    code, _, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json", "-q")
    assert code == 1 and "No space left on device" in err
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_check_defaults_follow_the_passes_tolerances():
    from graphopt.cli.check import check_limits
    from graphopt.passes import make_spec

    assert check_limits([make_spec("dce")], None, None) == (1e-4, 0.999, False)
    assert check_limits([make_spec("fuse_gelu"), make_spec("decompose_attention")], None, None)[0] == 1e-4
    assert check_limits([make_spec("lora_merge"), make_spec("fuse_low_rank")], None, None)[0] == pytest.approx(2e-4)
    assert check_limits([make_spec("token_merge")], None, None) == (float("inf"), 0.9, True)
    assert check_limits([make_spec("dce")], 0.5, 0.2) == (0.5, 0.2, False)


def test_onnxruntime_crash_in_check_is_one_line(tmp_path, capsys):
    """ORT 1.32 segfaults on a valid LayerNormalization without its optional bias; opt-cli must survive it."""
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    m = model([helper.make_node("LayerNormalization", ["x", "scale", ""], ["y"], axis=-1)],
              [vi("x", F, [2, 4])], [vi("y", F, [2, 4])], [scale])
    path = tmp_path / "ln.onnx"
    path.write_bytes(m.SerializeToString())
    code, _, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--check", "--runs", "1", "--warmup", "0", "-q")
    if code == 1:  # the ORT crash, contained
        assert err.strip().splitlines() == [err.strip()]
        assert "ONNX Runtime crashed (SIGSEGV)" in err and "nothing was written" in err
        assert not (tmp_path / "out.onnx").exists()
    else:  # an ONNX Runtime without the bug: the check itself must pass
        assert code == 0, err


# ---- malformed files: exit 2, one line naming the tensor or node -----------------------------------
def _layer_norm_model(opset=18):
    ln = [numpy_helper.from_array(np.ones(4, np.float32), "scale"),
          numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    return model([helper.make_node("LayerNormalization", ["x", "scale", "b"], ["y"], axis=-1)],
                 [vi("x", F, [2, 4])], [vi("y", F, [2, 4])], ln, opset)


def _malformed(kind, folder):
    """The file's bytes (or a model to serialise); None for the kinds that are no file: a folder, a missing path."""
    x4, y4 = [vi("x", F, [4])], [vi("y", F, [4])]
    if kind in ("directory", "missing-file"):
        return None
    if kind == "not-onnx":
        return b"this is a text file, not a model\n" * 20
    if kind == "empty":
        return b""
    if kind == "truncated":
        data = _layer_norm_model().SerializeToString()
        return data[: len(data) * 6 // 10]
    if kind == "cyclic":
        return model([helper.make_node("Add", ["x", "b"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["b"]),
                      helper.make_node("Neg", ["a"], ["y"])], x4, y4)
    if kind == "missing-initializer":
        return model([helper.make_node("MatMul", ["x", "weight"], ["y"], name="mm")], x4, y4)
    if kind in ("opset-7", "opset-future"):
        return _layer_norm_model(opset=7 if kind == "opset-7" else 99)
    if kind in ("external-parent", "external-absolute"):
        (folder.parent / "secret.bin").write_bytes(b"\0" * 16)
        location = "../secret.bin" if kind == "external-parent" else "/etc/passwd"
        return add_model(external(numpy_helper.from_array(np.ones(4, np.float32), "w"), location, 16))
    if kind == "raw-data-size":
        w = numpy_helper.from_array(np.ones(4, np.float32), "w")
        w.raw_data = w.raw_data[:6]
        return add_model(w)
    if kind == "typed-data-count":
        w = TensorProto(name="w", data_type=F, dims=[4])
        w.float_data.extend([1.0, 2.0, 3.0])
        return add_model(w)
    if kind == "segment":
        w = numpy_helper.from_array(np.ones(4, np.float32), "w")
        w.segment.begin, w.segment.end = 0, 2
        return add_model(w)
    if kind == "external-size":
        (folder / "w.bin").write_bytes(b"\0" * 16)
        return add_model(external(numpy_helper.from_array(np.ones(4, np.float32), "w"), "w.bin", 12))
    if kind == "external-nul":
        return add_model(external(numpy_helper.from_array(np.ones(4, np.float32), "w"), "w.b\0in", 16))
    if kind == "negative-dim":
        return model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", F, [-3, 2])], [vi("y", F, None)])
    if kind == "invalid-utf8":
        data = model([helper.make_node("Relu", ["x"], ["y"])], x4, y4).SerializeToString()
        return data.replace(b"Relu", b"R\xffl\xfe")
    if kind == "int64-overflow":
        big, four = numpy_helper.from_array(np.array([2 ** 62], np.int64), "a"), numpy_helper.from_array(
            np.array([4], np.int64), "b")
        return model([helper.make_node("Mul", ["a", "b"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
                     x4, [vi("y", F, None)], [big, four])
    if kind == "gather-axis-99":
        i = numpy_helper.from_array(np.array([0], np.int64), "i")
        return model([helper.make_node("Gather", ["x", "i"], ["y"], axis=99, name="gather")], [vi("x", F, [4, 3])],
                     [vi("y", F, None)], [i])
    if kind == "sparse-index-out-of-range":
        m = model([helper.make_node("Add", ["x", "w"], ["y"])], x4, y4)
        m.graph.sparse_initializer.append(helper.make_sparse_tensor(
            numpy_helper.from_array(np.ones(2, np.float32), "w"), numpy_helper.from_array(np.array([1, 9]), "i"), [4]))
        return m
    if kind == "huge-shape-operand":  # 69 bytes declaring a 30,000,000-dim tensor
        return model([helper.make_node("ConstantOfShape", ["x"], ["y"], name="cos")], [vi("x", I64, [30000000])],
                     [vi("y", F, None)])
    raise AssertionError(kind)


MALFORMED = {
    "not-onnx": "not an ONNX model",
    "empty": "the file is empty",
    "truncated": "truncated or corrupt",
    "cyclic": "the graph has a cycle",
    "missing-initializer": "reads 'weight', which no node, graph input or initializer defines",
    "opset-7": "opset 7 is older than 13 and onnx.version_converter cannot convert node #0 (LayerNormalization)",
    "opset-future": "opset 99 is not supported",
    "external-parent": "outside the model's folder",
    "external-absolute": "absolute path '/etc/passwd'",
    "directory": "is a directory",
    "missing-file": "no such file",
    "raw-data-size": "initializer 'w' has 6 bytes of raw data, its dims [4] and type float need 16",
    "typed-data-count": "initializer 'w' has 3 entries in float_data, its dims [4] need 4",
    "segment": "initializer 'w' uses the 'segment' field",
    "external-size": "external data for tensor 'w' is 12 bytes, its dims [4] need 16",
    "external-nul": "initializer 'w' has a NUL byte in its external data entry 'location'",
    "negative-dim": "value 'x' (graph) has a negative dim -3",
    "invalid-utf8": "model.graph.node[0].op_type is not valid UTF-8",
    "int64-overflow": "the Mul node computing 's' gets [18446744073709551616] in shape arithmetic, which overflows",
    "gather-axis-99": "Gather",
    "sparse-index-out-of-range": "sparse initializer 'w': an index is outside the 4 elements",
    "huge-shape-operand": "node 'cos' (ConstantOfShape) reads 'x' as a list of 30000000 dims or axes",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_file_exits_2_naming_the_tensor_or_node(kind, tmp_path, capsys):
    """One error line (exit 2), only progress lines on stdout, nothing written, the folder byte-identical."""
    folder = tmp_path / "models"  # external data may point at its parent: a file outside the model's folder
    folder.mkdir()
    path = folder / "bad.onnx"
    data = _malformed(kind, folder)
    if kind == "directory":
        path.mkdir()
    elif data is not None:
        path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    before = snapshot(folder)
    code, stdout, err = cli(capsys, path, "-o", folder / "out.onnx", "-p", "constant_folding", "-p", "dce", "--check")
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err and "internal error" not in err
    assert err.startswith("opt-cli: error: ") and MALFORMED[kind] in err, err
    assert all(re.fullmatch(r"opt-cli: .*(: done \(\d+\.\d s\)| \.\.\.)", line) for line in stdout.splitlines()), stdout
    assert snapshot(folder) == before


def test_debug_shows_the_traceback(tmp_path, capsys):
    path = tmp_path / "cyclic.onnx"
    path.write_bytes(_malformed("cyclic", tmp_path).SerializeToString())
    code, _, stderr = cli(capsys, path, "--debug")
    assert code == 2 and "Traceback" in stderr and stderr.strip().splitlines()[-1].startswith("opt-cli: error:")


# ---- valid but unusual models are accepted ----------------------------------------------------------
def test_sparse_initializer_is_densified(tmp_path, capsys):
    m = model([helper.make_node("Add", ["x", "w"], ["y"])], [vi("x", F, [2, 3])], [vi("y", F, [2, 3])])
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([5.0, -2.0], np.float32), "w"),
        numpy_helper.from_array(np.array([[0, 1], [1, 2]], np.int64), "w_indices"), [2, 3]))
    path, out = tmp_path / "sparse.onnx", tmp_path / "out.onnx"
    path.write_bytes(m.SerializeToString())
    code, _, err = cli(capsys, path, "-o", out, "-p", "constant_folding", "-q")
    assert code == 0, err
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = x + np.array([[0, 5, 0], [0, 0, -2]], np.float32)
    np.testing.assert_array_equal(ort_run(path, {"x": x})[0], expected)  # ONNX Runtime runs the sparse original
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], expected)


def _gelu_model(x_shape, const_shape):
    c = lambda name, v: numpy_helper.from_array(np.full(const_shape, v, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    return model(nodes, [vi("x", F, x_shape)], [vi("y", F, None)],
                 [c("sqrt2", np.sqrt(2.0)), c("one", 1.0), c("half", 0.5)])


@pytest.mark.parametrize("x_shape,fused", [([4, 8], 0), ([2, 4, 8], 1)])
def test_fuse_gelu_with_broadcasting_constants(x_shape, fused, tmp_path, capsys):
    """Constants of shape [1,1,1]: on a rank-2 x they broadcast it to rank 3 (not one gelu(x): left alone,
    the run still succeeds); on a rank-3 x they are scalars in effect and the GELU is fused."""
    path, out, report = tmp_path / "gelu.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    path.write_bytes(_gelu_model(x_shape, [1, 1, 1]).SerializeToString())
    code, _, err = cli(capsys, path, "-o", out, "-p", "fuse_gelu", "-q", "--report", report)
    assert code == 0, err
    counters = json.loads(report.read_text())["pipeline"]["passes"][0]["counters"]
    assert counters["fuse_gelu.erf"] == fused
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(path, {"x": x})[0], atol=1e-5)


def test_constant_loop_is_not_folded(tmp_path, capsys):
    """A 2**62-iteration Loop on constants: constant_folding leaves it (it used to run it forever)."""
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", [vi("i", I64, []), vi("c_in", TensorProto.BOOL, []), vi("v_in", F, [1])],
        [vi("c_out", TensorProto.BOOL, []), vi("v_out", F, [1])], [one])
    consts = [numpy_helper.from_array(np.array(2 ** 62, np.int64), "M"),
              numpy_helper.from_array(np.array(True), "cond"), numpy_helper.from_array(np.zeros(1, np.float32), "v0")]
    m = model([helper.make_node("Loop", ["M", "cond", "v0"], ["v"], body=body), helper.make_node("Add", ["x", "v"], ["y"])],
              [vi("x", F, [1])], [vi("y", F, [1])], consts)
    path, out = tmp_path / "loop.onnx", tmp_path / "out.onnx"
    path.write_bytes(m.SerializeToString())
    assert len(path.read_bytes()) < 400
    code, _, err = cli(capsys, path, "-o", out, "-p", "constant_folding", "-q")
    assert code == 0, err
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Loop", "Add"]


def test_constant_folding_caps_the_flops_of_one_fold():
    import torch

    from graphopt.ir import Graph, TensorType
    from graphopt.passes import PassManager

    def folded(**options):
        g = Graph()
        x = g.add_input("x", TensorType(torch.float32, (4, 4)))
        a, b = g.add_constant(torch.ones(4, 4), "a"), g.add_constant(torch.full((4, 4), 2.0), "b")
        g.set_outputs([g.op.add(x, g.op.matmul(a, b))])  # the matmul costs 2*4*4*4 = 128 FLOPs
        out, report = PassManager([("constant_folding", options)]).run(g)
        return out.op_counts(), report["constant_folding"].counters

    assert folded() == ({"add": 1}, {"folded": 1})
    assert folded(max_flops=100) == ({"matmul": 1, "add": 1}, {"skipped_too_much_work": 1})
