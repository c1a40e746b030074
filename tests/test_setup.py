"""The README's commands are the ones CI runs, and the package installs as graphopt only."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]


def test_ci_runs_the_readmes_commands():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^    (python3 -m pip install torch==2\.13\.0 .*)$", readme, re.M)
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(command in ci for command in commands), commands


def test_wheel_installs_graphopt_only(tmp_path):
    """pip install . must put graphopt/ (with ir, passes, ...) in site-packages and nothing else."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("graphopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"graphopt", next(t for t in tops if t.endswith(".dist-info"))}
    packages = [p.parent.relative_to(ROOT).as_posix() for p in ROOT.rglob("__init__.py")
                if p.parent != ROOT and p.relative_to(ROOT).parts[0] not in ("tests", "bench", "tools", "build")
                and not p.relative_to(ROOT).parts[0].startswith(".")]
    assert {"ir/ops", "backends/onnx", "frontends/onnx", "passes/integer_only", "cli", "zoo"} <= set(packages)
    missing = [sub for sub in packages if f"graphopt/{sub}/__init__.py" not in names]
    assert missing == [], f"packages missing from pyproject.toml's [tool.setuptools] packages: {missing}"
    assert {"graphopt/backends/cpu_integer_kernels.c", "graphopt/backends/cpu_sparse_kernels.c"} <= set(names)
    assert not any(n.startswith(("graphopt/tests/", "graphopt/bench/")) for n in names)


def test_strict_deps_fails_a_test_skipped_for_a_missing_module(pytester, monkeypatch):
    """CI sets GRAPHOPT_STRICT_DEPS: a module left out of pyproject.toml fails the run instead of skipping."""
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_probe="import pytest\n\ndef test_x():\n    pytest.importorskip('no_such_module_xyz')\n")
    monkeypatch.delenv("GRAPHOPT_STRICT_DEPS", raising=False)
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(skipped=1)
    monkeypatch.setenv("GRAPHOPT_STRICT_DEPS", "1")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(failed=1)
