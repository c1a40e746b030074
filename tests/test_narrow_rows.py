"""narrow_rows, before / expected: a select of one token moves up to the values something reads whole,
so the ops after it run on that token; it stops at ops that mix tokens. On models: a ViT classifier's
last block runs on its CLS token (float within the tolerance; after integer_only bit-identical on the
reference ops, cpu_integer, ONNX Runtime and its custom ops), a BERT classifier with padding masks, a
Llama-style decoder keeping the last position's logits."""
import pytest
import torch

import graphopt
from graphopt.ir import Graph, assert_structurally_equal
from graphopt.passes import PassError, PassManager
from tests.textir import assert_same_numbers, run_pass
from tests.tiny_models import padded_ids

transformers = pytest.importorskip("transformers")


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"wq": torch.randn(4, 4, generator=g), "wk": torch.randn(4, 4, generator=g)}


BEFORE = """
graph main(%x: f32[batch,5,4]) {
  %wq: f32[4,4] = constant
  %wk: f32[4,4] = constant
  %h: f32[batch,5,4] = layer_norm(%x, normalized_shape=[4])
  %q: f32[batch,5,4] = linear(%h, %wq)
  %k: f32[batch,5,4] = linear(%h, %wk)
  %kt: f32[batch,4,5] = permute(%k, dims=[0,2,1])
  %s: f32[batch,5,5] = matmul(%q, %kt)
  %p: f32[batch,5,5] = softmax(%s, dim=-1)
  %o: f32[batch,5,4] = matmul(%p, %h)
  %r: f32[batch,5,4] = add(%o, %x)
  %g: f32[batch,5,4] = gelu(%r)
  %c: f32[batch,4] = select(%g, dim=1, index=0)
  return %c
}"""

EXPECTED = """
graph main(%x: f32[batch,5,4]) {
  %wq: f32[4,4] = constant
  %wk: f32[4,4] = constant
  %h: f32[batch,5,4] = layer_norm(%x, normalized_shape=[4])
  %h0: f32[batch,1,4] = slice(%h, dim=1, start=0, end=1)
  %q: f32[batch,1,4] = linear(%h0, %wq)
  %k: f32[batch,5,4] = linear(%h, %wk)
  %kt: f32[batch,4,5] = permute(%k, dims=[0,2,1])
  %s: f32[batch,1,5] = matmul(%q, %kt)
  %p: f32[batch,1,5] = softmax(%s, dim=-1)
  %o: f32[batch,1,4] = matmul(%p, %h)
  %x0: f32[batch,1,4] = slice(%x, dim=1, start=0, end=1)
  %r: f32[batch,1,4] = add(%o, %x0)
  %g: f32[batch,1,4] = gelu(%r)
  %c: f32[batch,4] = select(%g, dim=1, index=0)
  return %c
}"""


def test_a_read_token_runs_alone_after_the_keys():
    """The query row, its scores, softmax and output, the residual and the activation run on token 0; the
    keys, the values (%h, read whole by the second matmul) and the graph input stay whole."""
    before = Graph.parse(BEFORE, constants=_weights())
    after, report = run_pass(before, "narrow_rows")
    assert_structurally_equal(after, Graph.parse(EXPECTED, constants=_weights()))
    assert report.counters == {"ops_narrowed": 6}
    assert_same_numbers(before, after, [torch.randn(3, 5, 4)], atol=1e-6)


LAST = """
graph main(%x: f32[batch,5,4]) {
  %wq: f32[4,4] = constant
  %wk: f32[4,4] = constant
  %q: f32[batch,5,4] = linear(%x, %wq)
  %t: f32[batch,5,4] = tanh(%q)
  %c: f32[batch,2,4] = slice(%t, dim=1, start=-2)
  return %c
}"""


def test_a_slice_of_the_last_positions_moves_too():
    before = Graph.parse(LAST, constants=_weights())
    after, report = run_pass(before, "narrow_rows")
    assert report.counters == {"ops_narrowed": 2}
    assert [n.op for n in after.nodes] == ["slice", "linear", "tanh"]
    assert next(after.nodes).inputs[0] is after.inputs[0]
    assert_same_numbers(before, after, [torch.randn(2, 5, 4)], atol=1e-6)


@pytest.mark.parametrize("text", [
    """graph main(%x: f32[batch,5,4]) {
  %p: f32[batch,5,4] = softmax(%x, dim=1)
  %c: f32[batch,4] = select(%p, dim=1, index=0)
  return %c
}""",
    """graph main(%q: f32[batch,2,5,4], %k: f32[batch,2,5,4], %v: f32[batch,2,5,4]) {
  %o: f32[batch,2,5,4] = sdpa(%q, %k, %v, is_causal=True)
  %c: f32[batch,2,4] = select(%o, dim=2, index=-1)
  return %c
}""",
    """graph main(%x: f32[batch,5,4]) {
  %m: f32[batch,4] = mean(%x, dims=[1])
  %h: f32[batch,5,4] = gelu(%x)
  return %m, %h
}""",
], ids=["softmax over the tokens mixes them", "a causal mask is aligned to the first query", "every row is read"])
def test_nothing_to_narrow_is_a_clear_error_and_the_graph_stays(text):
    graph = Graph.parse(text)
    before = str(graph)
    with pytest.raises(PassError, match="does not apply: no op can run on fewer rows"):
        PassManager(["narrow_rows"]).run(graph)
    assert str(graph) == before


def test_a_second_run_has_nothing_left_to_narrow():
    once, _ = run_pass(Graph.parse(BEFORE, constants=_weights()), "narrow_rows")
    with pytest.raises(PassError, match="does not apply"):
        PassManager(["narrow_rows"]).run(once)


def test_a_slice_stops_where_another_reader_needs_every_row():
    """%y feeds the select and a sum over tokens: narrowing it would starve the sum."""
    text = """
graph main(%x: f32[batch,5,4]) {
  %wq: f32[4,4] = constant
  %wk: f32[4,4] = constant
  %y: f32[batch,5,4] = linear(%x, %wq)
  %g: f32[batch,5,4] = gelu(%y)
  %c: f32[batch,4] = select(%g, dim=1, index=0)
  %s: f32[batch,4] = sum(%y, dims=[1])
  return %c, %s
}"""
    before = Graph.parse(text, constants=_weights())
    after, report = run_pass(before, "narrow_rows")
    assert report.counters == {"ops_narrowed": 1}                    # the gelu only
    assert [n.op for n in after.nodes] == ["linear", "slice", "gelu", "select", "sum"]
    assert_same_numbers(before, after, [torch.randn(2, 5, 4)], atol=1e-6)


def _fc1_rows(graph) -> list:
    """The token count of each block's fc1 output (the GEMMs with 4x the hidden width)."""
    return [n.output.type.shape[1] for n in graph.nodes if n.op in ("linear", "int.linear")
            and n.output.type.rank == 3 and n.output.type.shape[-1] == 4 * n.inputs[0].type.shape[-1]]


@pytest.fixture(scope="module")
def vit_classifier():
    """A DeiT-shaped HF ViT classifier (2 blocks, 36x36 images: 81 patches + CLS), its float and integer graphs."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1536,
                                 image_size=36, patch_size=4, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(9)
    calib = [(torch.randn(4, 3, 36, 36, generator=g),) for _ in range(2)]
    integer = graphopt.optimize(model, [("integer_only", {"smoothquant": 0.7})], calib[0], calibration=calib).graph
    return model, calib, integer


def test_vit_classifier_float(vit_classifier):
    model, calib, _ = vit_classifier
    result = graphopt.optimize(model, ["narrow_rows"], calib[0])
    assert _fc1_rows(result.graph) == [82, 1]
    for batch in (1, 3):
        x = torch.randn(batch, 3, 36, 36)
        with torch.no_grad():
            want = model(x).logits
        torch.testing.assert_close(result(x).logits, want, atol=1e-5, rtol=1e-5)


def test_vit_classifier_integer_bit_identical_on_every_backend(vit_classifier):
    """After integer_only the last block runs on the CLS token and every output integer is what the whole
    block gave: on the reference ops, cpu_integer (all on kernels), ONNX Runtime's standard ops and the
    custom-op library, batch 1 and 3, repeated calls."""
    from graphopt.backends.registry import lower
    _, _, integer = vit_classifier
    narrowed, report = PassManager(["narrow_rows"]).run(integer)
    assert report["narrow_rows"].counters["ops_narrowed"] >= 20
    assert _fc1_rows(narrowed) == [82, 1]
    reference = lower(integer, "torch")
    cpu = lower(narrowed, "cpu_integer", threads=2)
    assert not [e for e in cpu.report if e.kernel == "reference" and "(int." in e.nodes], str(cpu.report)
    backends = {"reference": lower(narrowed, "torch"), "cpu_integer": cpu, "onnxruntime": lower(narrowed, "onnxruntime")}
    from graphopt.backends import cpu_integer_library as kernels
    try:
        kernels.library()
        from graphopt.backends.onnx.cpu_integer_ops import to_onnx_custom_ops
        from graphopt.backends.onnxruntime_backend import custom_ops_session
        session = custom_ops_session(to_onnx_custom_ops(narrowed), threads=2)
        backends["custom ops"] = lambda x: [torch.from_numpy(session.run(None, {narrowed.inputs[0].name: x.numpy()})[0])]
    except kernels.KernelBuildError:
        pass
    g = torch.Generator().manual_seed(3)
    for batch in (1, 3, 1, 3):
        x = torch.randn(batch, 3, 36, 36, generator=g)
        want = reference.run_flat(x)[0]
        for name, ex in backends.items():
            got = ex(x)[0] if name == "custom ops" else ex.run_flat(x)[0]
            assert torch.equal(got, want), name


def test_bert_classifier_with_padding_masks():
    """BertForSequenceClassification reads the CLS token through its pooler: the last layer's queries, MLP and
    norms run on it, and the outputs follow each call's padding mask."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids, mask = padded_ids(g, 3, 12)
    result = graphopt.optimize(model, ["narrow_rows"], ((), {"input_ids": ids, "attention_mask": mask}))
    assert _fc1_rows(result.graph) == [12, 1]
    for n in (3, 2, 3):
        ids, mask = padded_ids(g, n, 12)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(result(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_llama_decoder_keeping_the_last_logits(with_mask):
    """logits_to_keep=1 slices the last position: the last layer's query, attention row (with its row of the
    causal mask, which the capture makes explicit), output projection and MLP run on it; with left padding
    the outputs follow each call's mask."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (2, 10), generator=g)
    left_padded = lambda pad: (torch.arange(10) >= torch.tensor(pad)[:, None]).long()
    feed = {"input_ids": ids, "logits_to_keep": 1, "use_cache": False}
    if with_mask:
        feed["attention_mask"] = left_padded([0, 3])
    result = graphopt.optimize(model, ["narrow_rows"], ((), feed))
    down = [n for n in result.graph.nodes if n.op == "linear" and n.output.type.shape[-1] == 32
            and n.inputs[0].type.shape[-1] == 64]
    assert [n.output.type.shape[1] for n in down] == [10, 1]
    assert [n.inputs[0].type.shape[2] for n in result.graph.nodes if n.op == "sdpa"] == [10, 1]
    q_proj = [n for n in result.graph.nodes if n.op == "linear" and n.meta.get("module", "").endswith("q_proj")]
    assert [n.output.type.shape[1] for n in q_proj] == [10, 1]        # through RoPE's rotate_half (slices, cat)
    for pad in ([0, 3], [2, 0]) if with_mask else ([],):
        if with_mask:
            feed["attention_mask"] = left_padded(pad)
        with torch.no_grad():
            want = model(**feed).logits
        assert want.shape[1] == 1
        torch.testing.assert_close(result(**feed).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["exact_exporter", "legacy_exporter"])
def test_vit_classifier_file_after_integer_only(dynamo, tmp_path):
    """An ONNX ViT classifier (its CLS read as Gather or Slice + Squeeze, its heads split by the exporter's own
    reshapes): the last block runs on the CLS token, and cpu_integer and ONNX Runtime give the output
    integers of the whole integer graph."""
    import contextlib
    import io

    pytest.importorskip("onnxscript")
    from graphopt.backends.registry import lower
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                 image_size=32, patch_size=8, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(4)
    calib = [(torch.randn(2, 3, 32, 32, generator=g),) for _ in range(2)]
    path = str(tmp_path / "vit.onnx")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, calib[0], path, dynamo=dynamo, input_names=["pixel_values"], output_names=["logits"])
    integer = graphopt.optimize(path, ["integer_only"], calib[0], calibration=calib).graph
    narrowed, _ = PassManager(["narrow_rows"]).run(integer)
    assert _fc1_rows(narrowed) == [17, 1]
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        want = lower(integer, "torch").run_flat(x)[0]
        assert torch.equal(lower(narrowed, "cpu_integer", threads=2).run_flat(x)[0], want)
        assert torch.equal(lower(narrowed, "onnxruntime").run_flat(x)[0], want)


def _deit_with_teacher():
    torch.manual_seed(0)
    cfg = transformers.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                  image_size=32, patch_size=8, num_labels=5)
    return transformers.DeiTForImageClassificationWithTeacher(cfg).eval()


def test_two_read_tokens_narrow_to_the_rows_between_them():
    """DeiT with a teacher reads the CLS and the distillation token (rows 0 and 1): the last block runs on
    rows 0..2, and each head reads its own row of that."""
    model = _deit_with_teacher()
    x = torch.randn(2, 3, 32, 32)
    result = graphopt.optimize(model, ["narrow_rows"], (x,))
    assert _fc1_rows(result.graph) == [18, 2]
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = model(x)
        got = result(x)
        for key in ("logits", "cls_logits", "distillation_logits"):
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)


def test_a_select_nothing_reads_does_not_hold_the_rows_back():
    """A wrapper returning only the CLS head's logits leaves the distillation token's select dead in the capture."""
    teacher = _deit_with_teacher()

    class ClsLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = teacher

        def forward(self, x):
            return self.model(pixel_values=x).cls_logits

    x = torch.randn(2, 3, 32, 32)
    result = graphopt.optimize(ClsLogits().eval(), ["narrow_rows"], (x,))
    assert _fc1_rows(result.graph) == [18, 1]
    with torch.no_grad():
        torch.testing.assert_close(result(x), teacher(x).cls_logits, atol=1e-5, rtol=1e-5)


def test_one_logit_of_an_integer_classifier_lowers_to_onnx(tmp_path):
    """Reading one logit column slices the classifier's per-channel requant and dequantize scales: they become
    constants (ONNX lowerings need constant scales), and ONNX Runtime gives the reference's integers."""
    from graphopt.backends.registry import lower
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=5)).eval()

    class PositiveScore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = vit

        def forward(self, x):
            return self.model(x).logits[:, 1]

    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(2)]
    om = graphopt.optimize(PositiveScore().eval(), ["integer_only", "narrow_rows"], calib[0], calibration=calib)
    assert not [n for n in om.graph.nodes if n.op == "slice" and n.inputs[0].is_constant]
    x = torch.randn(3, 3, 32, 32, generator=g)
    want = lower(om.graph, "torch").run_flat(x)[0]
    assert want.shape == (3,)
    assert torch.equal(lower(om.graph, "onnxruntime").run_flat(x)[0], want)
    om.save(str(tmp_path / "positive.onnx"))
