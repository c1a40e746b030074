"""A seeded mutator against opt-cli's contract: whatever the file, exit 0 or 2, one line and no
traceback on stderr, no hang, bounded memory, the input untouched, and a written output that ONNX
accepts. Mutations act on the protobuf structure (dims, types, data, attributes, names, edges) and
on the raw bytes. Most cases call main() in-process; a sample runs in a child under RLIMIT_AS, as do
tiny files that declare huge work (a 30000x30000 input, a FIFO, /dev/zero)."""
import json
import os
import random
import resource
import signal
import stat
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main

CASES = 300
PER_CASE_SECONDS = 20
MEMORY_LIMIT = int(4.5 * 2 ** 30)
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def seed_models() -> list[onnx.ModelProto]:
    rng = np.random.default_rng(0)
    arr = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    vi = helper.make_tensor_value_info
    heads = model([
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "w"], ["mm"], name="mm"),
        helper.make_node("Shape", ["mm"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero", "two"], ["lead"], name="slice"),
        helper.make_node("Concat", ["lead", "heads"], ["split_shape"], axis=0, name="concat"),
        helper.make_node("Reshape", ["mm", "split_shape"], ["split"], name="reshape"),
        helper.make_node("Softmax", ["split"], ["p"], axis=-1, name="softmax"),
        helper.make_node("Gather", ["p", "idx"], ["g"], axis=2, name="gather"),
        helper.make_node("Relu", ["g"], ["y"], name="relu")],
        [vi("x", F, ["batch", "sequence", 8])], [vi("y", F, None)],
        [numpy_helper.from_array(a, n) for n, a in [
            ("w", arr(8, 8)), ("scale", np.ones(8, np.float32)), ("bias", np.zeros(8, np.float32)),
            ("heads", np.array([2, 4], np.int64)), ("zero", np.array([0], np.int64)), ("two", np.array([2], np.int64)),
            ("idx", np.array([1, 0], np.int64))]])
    gelu = model([
        helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["h", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])],
        [vi("x", F, ["batch", 4])], [vi("y", F, ["batch", 4])],
        [numpy_helper.from_array(arr(4, 4), "w"), numpy_helper.from_array(np.array(np.sqrt(2), np.float32), "sqrt2"),
         numpy_helper.from_array(np.array(1, np.float32), "one"), numpy_helper.from_array(np.array(.5, np.float32), "half")])
    const = model([
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(arr(3, 4), "c")),
        helper.make_node("Transpose", ["c"], ["t"], perm=[1, 0]),
        helper.make_node("Expand", ["t", "shape"], ["e"]),
        helper.make_node("Add", ["x", "e"], ["s"]),
        helper.make_node("ReduceSum", ["s", "axes"], ["y"], keepdims=1)],
        [vi("x", F, [2, 4, 3])], [vi("y", F, None)],
        [numpy_helper.from_array(np.array([2, 4, 3], np.int64), "shape"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    sparse = model([helper.make_node("Add", ["x", "w"], ["y"])], [vi("x", F, [2, 3])], [vi("y", F, [2, 3])])
    sparse.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([5.0, -2.0], np.float32), "w"),
        numpy_helper.from_array(np.array([1, 5], np.int64), "w_idx"), [2, 3]))
    return [heads, gelu, const, sparse]


def model(nodes, inputs, outputs, inits=()):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                             opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


INTERESTING = [0, 1, -1, 2, 3, 7, 99, -99, 2 ** 31, 2 ** 62, -(2 ** 63), 30000, 2 ** 63 - 1]


def mutate(m: onnx.ModelProto, rng: random.Random) -> bytes:
    """One to three structural mutations, sometimes followed by byte-level damage."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    g = m.graph
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["dim", "dim", "dtype", "raw", "typed", "attr", "attr", "edge", "op", "input_dim",
                           "segment", "external", "opset", "drop_node", "value", "string"])
        tensors = list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.HasField("t")]
        tensors += [s.values for s in g.sparse_initializer] + [s.indices for s in g.sparse_initializer]
        if kind == "dim" and tensors:
            t = rng.choice(tensors)
            if len(t.dims):
                t.dims[rng.randrange(len(t.dims))] = rng.choice(INTERESTING)
            else:
                t.dims.append(rng.choice(INTERESTING))
        elif kind == "dtype" and tensors:
            rng.choice(tensors).data_type = rng.randrange(0, 30)
        elif kind == "raw" and tensors:
            t = rng.choice(tensors)
            t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)] + bytes(rng.randrange(3))
        elif kind == "typed" and tensors:
            t = rng.choice(tensors)
            t.ClearField("raw_data")
            t.float_data.extend([1.0] * rng.randrange(4))
        elif kind == "attr" and g.node:
            node = rng.choice(g.node)
            if node.attribute:
                a = rng.choice(node.attribute)
                if a.type == onnx.AttributeProto.INT:
                    a.i = rng.choice(INTERESTING)
                elif a.type == onnx.AttributeProto.INTS and a.ints:
                    a.ints[rng.randrange(len(a.ints))] = rng.choice(INTERESTING)
            else:
                node.attribute.append(helper.make_attribute(rng.choice(["axis", "perm", "keepdims"]),
                                                            rng.choice(INTERESTING)))
        elif kind == "edge" and g.node:
            node = rng.choice(g.node)
            names = [i.name for i in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]
            if node.input:
                node.input[rng.randrange(len(node.input))] = rng.choice(names + ["", "nowhere"])
        elif kind == "op" and g.node:
            rng.choice(g.node).op_type = rng.choice(["Relu", "Gather", "Reshape", "Expand", "Loop", "Tile", "Concat",
                                                    "ConstantOfShape", "Range", "Squeeze", "NoSuchOp", "Softmax"])
        elif kind == "input_dim" and g.input:
            vi = rng.choice(g.input)
            dims = vi.type.tensor_type.shape.dim
            if dims:
                d = dims[rng.randrange(len(dims))]
                if rng.random() < 0.3:
                    d.dim_param = rng.choice(["b", "x*y", "((", "seq//2", "\u00e9"])
                else:
                    d.dim_value = rng.choice(INTERESTING + [100000])
        elif kind == "segment" and tensors:
            rng.choice(tensors).segment.begin = 1
        elif kind == "external" and tensors:
            t = rng.choice(tensors)
            t.data_location = TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", rng.choice(["w.bin", "../x", "/etc/passwd", "a\0b", ""])
        elif kind == "opset":
            m.opset_import[0].version = rng.choice([1, 7, 12, 13, 18, 99])
        elif kind == "drop_node" and g.node:
            del g.node[rng.randrange(len(g.node))]
        elif kind == "value" and g.initializer:
            t = rng.choice(g.initializer)
            if t.data_type == TensorProto.INT64 and t.raw_data and len(t.raw_data) % 8 == 0:
                values = np.frombuffer(t.raw_data, np.int64).copy()
                values[rng.randrange(len(values))] = rng.choice(INTERESTING)
                t.raw_data = values.tobytes()
        elif kind == "string" and g.node:
            rng.choice(g.node).name = rng.choice(["", "n" * 300, "a/b", "x\ny"])
    data = m.SerializeToString()
    if rng.random() < 0.15 and data:
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    if rng.random() < 0.05:
        data = data[: rng.randrange(len(data) + 1)]
    return data


def cases():
    rng = random.Random(1234)
    seeds = seed_models()
    return [mutate(seeds[i % len(seeds)], rng) for i in range(CASES)]


def _valid(data: bytes) -> bool:
    try:
        onnx.checker.check_model(onnx.ModelProto.FromString(data))
        return True
    except Exception:  # the checker's ValidationError, protobuf's DecodeError
        return False


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def test_mutated_files_hold_the_exit_status_contract(tmp_path, capsys):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    previous = signal.signal(signal.SIGALRM, _alarm)
    problems, accepted = [], 0
    try:
        for i, data in enumerate(cases()):
            folder = tmp_path / f"c{i}"
            folder.mkdir()
            (folder / "w.bin").write_bytes(b"\1" * 64)
            path, out = folder / "m.onnx", folder / "out.onnx"
            path.write_bytes(data)
            signal.alarm(PER_CASE_SECONDS)
            try:
                code = main([str(path), "-o", str(out), "-p", "constant_folding", "-p", "fuse_gelu", "-p", "dce",
                             "-q"])
            except SystemExit as e:
                code = e.code
            except Hang:
                code = "hang"
            finally:
                signal.alarm(0)
            _, err = capsys.readouterr()
            accepted += code == 0
            lines = err.strip().splitlines()
            if code not in (0, 2) or "Traceback" in err or "internal error" in err or len(lines) > 1:
                problems.append(f"case {i}: exit {code}: {err.strip()[:300]}")
            if path.read_bytes() != data or (folder / "w.bin").read_bytes() != b"\1" * 64:
                problems.append(f"case {i}: an input file changed")
            if code == 0 and _valid(data):  # a valid input gives a valid output
                try:
                    onnx.checker.check_model(str(out))
                except Exception as e:
                    problems.append(f"case {i}: the output of a valid input fails onnx's checker: {e}")
            elif code != 0 and out.exists():
                problems.append(f"case {i}: exit {code} but the output was written")
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} of {CASES} cases)"
    assert CASES // 10 <= accepted <= CASES - CASES // 10, accepted  # the mutator reaches past the checks
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 1024, f"peak memory grew by {grown_mb:.0f} MB while fuzzing"


# ---- bounded memory: opt-cli in a child under RLIMIT_AS ------------------------------------------------
_LIMITED = """
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from graphopt.cli import main
codes = []
for argv in json.loads(sys.argv[2]):
    try:
        codes.append(main(argv))
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps(codes))
"""


def run_limited(runs: list[list[str]]) -> tuple[list[int], list[str]]:
    """opt-cli once per argv in ``runs``, in one child limited to MEMORY_LIMIT: (exit codes, stderr lines)."""
    done = subprocess.run([sys.executable, "-c", _LIMITED, str(MEMORY_LIMIT), json.dumps(runs)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr.strip().splitlines()


def test_mutated_files_under_a_memory_limit_with_check(tmp_path):
    """A sample of the cases with --check (ONNX Runtime in its child) in a process limited to MEMORY_LIMIT."""
    paths = []
    for i, data in enumerate(cases()[::15]):
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(data)
        paths.append(str(path))
    codes, errors = run_limited([[p, "-q", "-p", "constant_folding", "--check", "--runs", "1", "--warmup", "0"]
                                 for p in paths])
    assert len(codes) == len(paths)
    # 1 is allowed here: --check may find ONNX Runtime itself crashing or refusing a model
    assert set(codes) <= {0, 1, 2}, codes
    assert not any("Traceback" in e or "internal error" in e for e in errors), errors[-20:]
    assert len(errors) == sum(1 for c in codes if c != 0)


def test_tiny_files_with_huge_declarations_stay_within_a_memory_limit(tmp_path):
    vi = helper.make_tensor_value_info
    expand = model([helper.make_node("Expand", ["c", "s"], ["e"]), helper.make_node("Add", ["x", "e"], ["y"])],
                   [vi("x", I64, [1])], [vi("y", I64, None)],
                   [numpy_helper.from_array(np.array([1], np.int64), "c"),
                    numpy_helper.from_array(np.array([30000, 30000], np.int64), "s")])
    square = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", F, [30000, 30000])], [vi("y", F, None)])
    (tmp_path / "expand.onnx").write_bytes(expand.SerializeToString())
    (tmp_path / "square.onnx").write_bytes(square.SerializeToString())
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    runs = [[str(tmp_path / "expand.onnx"), "-q", "-p", "constant_folding", "-o", str(tmp_path / "e.onnx")],
            [str(tmp_path / "square.onnx"), "-q", "-o", str(tmp_path / "s.onnx")],  # no --check: no random input
            [str(tmp_path / "square.onnx"), "-q", "--check"],                      # refused by size, before allocating
            ["/dev/zero", "-q"], [str(fifo), "-q"]]
    codes, errors = run_limited(runs)
    assert codes == [0, 0, 2, 2, 2], errors
    assert "random inputs for --check / --verify-passes would take 3.6 GB (input 'x' is [30000, 30000])" in errors[0]
    assert errors[1:] == ["opt-cli: error: /dev/zero: is not a regular file (a device, pipe or socket); give the path "
                          "of an .onnx file",
                          f"opt-cli: error: {fifo}: is not a regular file (a device, pipe or socket); give the path "
                          "of an .onnx file"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [n.op_type for n in onnx.load(str(tmp_path / "e.onnx")).graph.node] == ["Expand", "Add"]  # not folded
