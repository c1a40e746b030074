"""opt-cli: round trips, the summary table and --check figures, reports, calibration files, output
safety (never the input, no overwrite without --force, atomic), usage errors, determinism (malformed
input: tests/test_cli_hostile.py)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.passes import register_pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F = TensorProto.FLOAT


def small_model(opset=18, batch="batch"):
    """LayerNorm -> MatMul -> Shape-derived reshape to heads -> Softmax -> reshape back -> Relu."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", F, [batch, "sequence", 8])
    y = helper.make_tensor_value_info("y", F, [batch, "sequence", 8])
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w", rng.standard_normal((8, 8)).astype(np.float32)), ("scale", np.ones(8, np.float32)),
        ("bias", np.zeros(8, np.float32)), ("heads", np.array([2, 4], np.int64)), ("zero", np.array([0], np.int64)),
        ("two", np.array([2], np.int64)), ("eight", np.array([8], np.int64)),
        ("big", rng.standard_normal((64, 64)).astype(np.float32))]]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "w"], ["mm"]),
        helper.make_node("Shape", ["mm"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "two"], ["lead"]),
        helper.make_node("Concat", ["lead", "heads"], ["split_shape"], axis=0),
        helper.make_node("Reshape", ["mm", "split_shape"], ["split"]),
        helper.make_node("Softmax", ["split"], ["p"], axis=-1),
        helper.make_node("Concat", ["lead", "eight"], ["merge_shape"], axis=0),
        helper.make_node("Reshape", ["p", "merge_shape"], ["merged"]),
        helper.make_node("Relu", ["merged"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "small", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(small_model().SerializeToString())
    return path


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ort_outputs(path_or_bytes, feeds):
    session = ort.InferenceSession(path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# ---- the happy path -----------------------------------------------------------------------------
def test_round_trip_with_check_and_table(tmp_path, model_path, capsys):
    out = tmp_path / "out.onnx"
    before = sha(model_path)
    code, stdout, stderr = run_cli(capsys, model_path, "-o", out, "-p", "dce", "-p", "cse", "--check", "--runs", "3",
                                   "--dim", "batch=2", "--dim", "sequence=5")
    assert code == 0, stderr
    assert sha(model_path) == before
    for text in ("ops (total)", "Reshape", "parameters", "weight bytes", "file bytes", "max abs error", "cosine",
                 "latency ratio"):
        assert text in stdout, text
    onnx.checker.check_model(str(out), full_check=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 7, 8)).astype(np.float32)}
    np.testing.assert_allclose(ort_outputs(out, feeds)[0], ort_outputs(model_path, feeds)[0], atol=1e-5)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".graphopt-")] == []


def test_output_is_deterministic(tmp_path, model_path, capsys):
    for name in ("a.onnx", "b.onnx"):
        assert run_cli(capsys, model_path, "-o", tmp_path / name, "-p", "cse", "-p", "dce")[0] == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_reports_json_and_html(tmp_path, model_path, capsys):
    code, _, err = run_cli(capsys, model_path, "-o", tmp_path / "o.onnx", "-p", "dce", "--check", "--runs", "2",
                           "--report", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"] == ["dce"]
    assert report["input"]["sha256"] == sha(model_path)
    assert report["output"]["sha256"] == sha(tmp_path / "o.onnx")
    assert report["input"]["ops"]["Shape"] == 1 and "Shape" not in report["output"]["ops"]
    assert report["check"]["max_abs_error"] < 1e-5 and report["check"]["cosine"] > 0.999999
    assert report["check"]["latency_ratio"] > 0
    assert report["pipeline"]["passes"][0]["name"] == "dce"
    code, _, err = run_cli(capsys, model_path, "-q", "--report", tmp_path / "r.html")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "ops (total)" in page


def test_calibration_file(tmp_path, model_path, capsys):
    calib = tmp_path / "calib.npz"
    x = np.random.default_rng(2).standard_normal((4, 2, 6, 8)).astype(np.float32)  # 4 samples
    np.savez(calib, x=x)
    code, _, err = run_cli(capsys, model_path, "--calib", calib, "--check", "--runs", "2", "-q",
                           "--report", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["inputs"]["samples"] == 4 and report["inputs"]["shapes"] == {"x": [2, 6, 8]}
    np.savez(tmp_path / "bad.npz", pixel_values=x)
    code, _, err = run_cli(capsys, model_path, "--calib", tmp_path / "bad.npz", "--check")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no array for input(s) x" in err and "unknown name(s) pixel_values" in err
    code, _, err = run_cli(capsys, model_path, "--calib", model_path, "--check")  # the model given as --calib
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is not an .npz archive: write one with numpy.savez" in err and "pickle" not in err


def test_calibration_arrays_of_another_dtype_are_cast_and_said_so(tmp_path, model_path, capsys):
    """float64 samples are cast to the input's float32 and the report's inputs line says it; a value float32
    cannot hold is refused with its index, and nothing is written."""
    x = np.random.default_rng(3).standard_normal((2, 2, 6, 8))
    np.savez(tmp_path / "f64.npz", x=x)
    code, _, err = run_cli(capsys, model_path, "--calib", tmp_path / "f64.npz", "--check", "--runs", "2", "-q",
                           "--report", tmp_path / "r.json", "-o", tmp_path / "out.onnx")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["inputs"]["source"].endswith("(x float64 cast to float32)")
    x[1, 0, 2, 5] = 1e300
    np.savez(tmp_path / "huge.npz", x=x)
    code, _, err = run_cli(capsys, model_path, "--calib", tmp_path / "huge.npz", "--check", "-o", tmp_path / "huge.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "array 'x' is float64 and holds 1e+300 at [1, 0, 2, 5], which float32 (the input's dtype) cannot hold" in err
    assert not (tmp_path / "huge.onnx").exists()
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", 4])
    y = helper.make_tensor_value_info("y", F, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Cast", ["ids"], ["y"], to=F)], "ids", [ids], [y])
    (tmp_path / "ids.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                                          ir_version=8).SerializeToString())
    np.savez(tmp_path / "ids.npz", ids=np.array([[1, 2, 3, 4], [5, 6, 2 ** 40, 8]], np.int64))
    code, _, err = run_cli(capsys, tmp_path / "ids.onnx", "--calib", tmp_path / "ids.npz", "--check")
    assert code == 2 and f"array 'ids' is int64 and holds {2 ** 40} at [1, 2], which int32" in err
    np.savez(tmp_path / "int_images.npz", x=np.ones((2, 6, 8), np.int64))       # an integer for a float input
    code, _, err = run_cli(capsys, model_path, "--calib", tmp_path / "int_images.npz", "--check")
    assert code == 2 and "array 'x' is int64, the input is float32" in err


def test_list_and_explain(capsys):
    code, out, _ = run_cli(capsys, "--list-passes")
    assert code == 0 and "dce" in out and "cse" in out
    code, out, _ = run_cli(capsys, "--explain", "cse")
    assert code == 0 and "max_constant_numel" in out and "what it rewrites" in out
    code, out, err = run_cli(capsys, "--explain", "csee")
    assert code == 2 and "did you mean 'cse'" in err and len(err.strip().splitlines()) == 1


def test_bad_pass_spec_fails_before_any_work(tmp_path, model_path, capsys):
    code, _, err = run_cli(capsys, model_path, "-o", tmp_path / "o.onnx", "-p", "cse:nope=1")
    assert code == 2 and "has no option 'nope'" in err
    assert not (tmp_path / "o.onnx").exists()


def test_a_pass_without_its_calibration_data_is_a_usage_error(tmp_path, model_path, capsys):
    code, _, err = run_cli(capsys, model_path, "-o", tmp_path / "o.onnx", "-p", "integer_only")
    assert code == 2 and "needs calibration data" in err and "--calib FILE.npz" in err
    assert not (tmp_path / "o.onnx").exists()


# ---- output safety ------------------------------------------------------------------------------
def test_never_overwrites_input_or_existing_files(tmp_path, model_path, capsys):
    before = model_path.read_bytes()
    for extra in ([], ["--force"]):
        code, _, err = run_cli(capsys, model_path, "-o", model_path, *extra)
        assert code == 2 and "refusing to overwrite the input" in err
    link = tmp_path / "alias.onnx"
    os.symlink(model_path, link)
    code, _, err = run_cli(capsys, model_path, "-o", link, "--force")
    assert code == 2 and "refusing to overwrite the input" in err
    assert model_path.read_bytes() == before
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, model_path, "-o", out)
    assert code == 2 and "already exists; pass --force" in err and out.read_bytes() == b"keep me"
    code, _, err = run_cli(capsys, model_path, "-o", out, "--force", "-q")
    assert code == 0, err
    onnx.checker.check_model(str(out))


if "test_cli.explode" not in __import__("graphopt").list_passes():
    @register_pass("test_cli.explode")
    def _explode(graph, ctx) -> None:
        """Always fails (tests that a failed run leaves the output untouched)."""
        raise RuntimeError("boom")


def test_failed_run_leaves_existing_output_untouched(tmp_path, model_path, capsys):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    code, _, err = run_cli(capsys, model_path, "-o", out, "--force", "-p", "test_cli.explode")
    assert code == 1 and "pass test_cli.explode" in err and "boom" in err
    assert len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "out.onnx"]


def test_usage_errors(tmp_path, model_path, capsys):
    assert run_cli(capsys)[0] == 2
    code, _, err = run_cli(capsys, model_path, "-o", tmp_path / "out.txt")
    assert code == 2 and "must end in .onnx" in err
    code, _, err = run_cli(capsys, model_path, "--dim", "nosuch=3", "--check")
    assert code == 2 and "no such input dim" in err
    code, _, err = run_cli(capsys, model_path, "-o", tmp_path / "missing" / "out.onnx")
    assert code == 2 and "does not exist" in err


# ---- the demo and the executables ----------------------------------------------------------------
def test_demo(tmp_path, capsys):
    pytest.importorskip("graphopt.zoo")
    out = tmp_path / "demo.onnx"
    code, stdout, err = run_cli(capsys, "--demo", "-o", out, "-p", "dce", "--check", "--runs", "2")
    assert code == 0, err
    assert "max abs error" in stdout
    onnx.checker.check_model(str(out), full_check=True)


def test_sigterm_removes_the_staged_outputs(tmp_path):
    """SIGTERM (a job's timeout, kill) unwinds like Ctrl-C: the staged model is removed and nothing is written
    (the default action had left the staging folder, a full copy of the output, beside it)."""
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "opt-cli"), str(path), "-o", str(out / "o.onnx"),
                             "-p", "dce", "--check", "--runs", "100000000", "--warmup", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    children = []
    try:
        while not children:                       # the output is staged and the --check's child runs on it
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
            children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 128 + signal.SIGTERM and "opt-cli: terminated" in err
        assert os.listdir(out) == []
        time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)]     # the check's child went with it
    finally:
        for pid in [proc.pid] + children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """Processes whose parent is pid (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        if entry.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_executables(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    commands = [[sys.executable, os.path.join(ROOT, "tools", "opt-cli")]]
    if shutil.which("opt-cli"):
        commands.append([shutil.which("opt-cli")])
    for command in commands:
        done = subprocess.run(command + [str(bad), "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [f"opt-cli: error: {bad}: not an ONNX model (protobuf cannot parse it)"]
    done = subprocess.run(commands[0] + ["--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--calib" in done.stdout
