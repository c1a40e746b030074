"""zero_padded_positions, and cpu_integer computing only the real tokens of a padded batch.

References: the original Hugging Face model (real positions exact, padding 0), the torch backend's
reference integer graph bit for bit, and the kernels without ``live`` (each live row bit for bit).
"""
from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.backends import cpu_integer_library as kernels
from graphopt.backends.registry import lower
from graphopt.ir import Graph, TensorType
from graphopt.passes import PassError, PassManager

transformers = pytest.importorskip("transformers")
U8, I8, I32 = torch.uint8, torch.int8, torch.int32


def _bert(pooling=False):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=300, max_position_embeddings=64)
    return transformers.BertModel(cfg, add_pooling_layer=pooling).eval()


def _feed(lengths, T=24, left=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, T - n:] = 1
        else:
            mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


def test_real_positions_keep_the_models_output_and_padding_is_zero():
    model, feed = _bert(), _feed([24, 9, 1, 17])
    graph = graphopt.optimize(model, ["zero_padded_positions"], ((), feed)).graph
    with torch.inference_mode():
        want = model(**feed).last_hidden_state
        got = _first(lower(graph, "torch")(**feed))
    keep = feed["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert bool((got[~keep] == 0).all()) and bool((want[~keep] != 0).any())


def _graph(mask_shape, out_shape):
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, out_shape))
    g.add_input("attention_mask", TensorType(torch.int64, mask_shape))
    g.set_outputs([g.op.relu(x)])
    return g


def test_refused_without_the_mask_input_or_a_token_output():
    with pytest.raises(PassError, match="no input 'mask_ids'.*inputs: x, attention_mask"):
        PassManager([("zero_padded_positions", {"mask": "mask_ids"})]).run(_graph((2, 3), (2, 3, 4)))
    with pytest.raises(PassError, match="not a \\[batch, tokens\\] mask"):
        PassManager(["zero_padded_positions"]).run(_graph((2, 3, 1), (2, 3, 4)))
    with pytest.raises(PassError, match="no output is \\[batch, tokens, ...\\]"):
        PassManager(["zero_padded_positions"]).run(_graph((2, 3), (2, 4, 3)))


def _integer(model, feed, calib, padded=True):
    float_graph = graphopt.optimize(model, [], ((), feed)).graph
    passes = [("integer_only", {"smoothquant": 0.7})] + (["zero_padded_positions"] if padded else [])
    return graphopt.optimize(float_graph, passes, ((), feed), calibration=[((), c) for c in calib]).graph


@pytest.mark.parametrize("left", [False, True])
def test_cpu_integer_skips_padding_and_stays_identical_to_the_reference(left):
    model = _bert()
    feed = _feed([24, 9, 0, 17, 1], left=left)
    graph = _integer(model, feed, [_feed([20, 12, 24, 5, 8], seed=s) for s in (1, 2)])
    ex = lower(graph, "cpu_integer", threads=2)
    assert ex.report.padding_rows > 20, str(ex.report)     # every GEMM, attention, LayerNorm, requant and add
    ref = lower(graph, "torch")
    with torch.inference_mode():
        for _ in range(2):                                   # repeated calls: nothing depends on stale buffers
            want, got = _first(ref(**feed)), _first(ex(**feed))
            assert torch.equal(got, want)
    keep = feed["attention_mask"].bool()
    unmasked = lower(_integer(model, feed, [_feed([20, 12, 24, 5, 8], seed=s) for s in (1, 2)], padded=False),
                     "cpu_integer", threads=2)
    with torch.inference_mode():
        assert torch.equal(_first(unmasked(**feed))[keep], got[keep]) and bool((got[~keep] == 0).all())


def test_an_output_that_reads_padded_rows_keeps_them_computed():
    model = _bert(pooling=True)          # the pooler reads token 0 of the last layer, beside the masked output
    feed = _feed([24, 3, 1])
    graph = _integer(model, feed, [_feed([10, 20, 6], seed=3)])
    ex = lower(graph, "cpu_integer", threads=2)
    ref = lower(graph, "torch")
    with torch.inference_mode():
        for want, got in zip(ref(**feed).values(), ex(**feed).values()):
            assert torch.equal(got, want)
    assert ex.report.padding_rows < 30, str(ex.report)


def test_live_rows_falls_back_to_every_row_when_a_mask_keeps_other_keys():
    from graphopt.backends.cpu_integer_rows import live_rows
    keep = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    exact = keep[:, None, None, :].expand(2, 1, 4, 4)
    assert torch.equal(live_rows(keep, exact), keep.to(U8))
    causal = exact & torch.ones(4, 4, dtype=torch.bool).tril()     # a real row masks a real key: no skipping
    assert torch.equal(live_rows(keep, causal), torch.ones(2, 4, dtype=U8))
    padded_rows_differ = exact.clone()
    padded_rows_differ[:, :, 3] = True                             # only padded query rows differ: fine
    assert torch.equal(live_rows(keep, padded_rows_differ), keep.to(U8))


def _live(rows, g):
    live = (torch.rand(rows, generator=g) < 0.4).to(U8)
    live[:13] = 1                                                   # a whole live block, then ragged ones
    live[20:40] = 0                                                 # and whole dead blocks
    return live


@pytest.mark.parametrize("kind,out", [("requant", U8), ("raw", I32), ("add", I32)])
def test_gemm_with_live_rows_computes_those_and_zeroes_the_rest(kind, out):
    g = torch.Generator().manual_seed(1)
    m, k, n = 70, 64, 48
    a, w = torch.randint(0, 256, (m, k), generator=g).to(U8), torch.randint(-128, 128, (n, k), generator=g).to(I8)
    packed, colsum = kernels.pack_b(w)
    bias = (torch.randint(-999, 999, (n,), generator=g) - 128 * colsum).to(I32)
    res = torch.randint(-5000, 5000, (m, n), generator=g).to(I32)
    epi = kernels.epilogue(kind, out, bias, pre=2, k=9, lo=-128 if out == U8 else -2 ** 31,
                           hi=127 if out == U8 else 2 ** 31 - 1, zp=128 if out == U8 else 0,
                           m=torch.full((n,), 3, dtype=I32), c=torch.full((n,), 7, dtype=I32),
                           res=res if kind == "add" else None, pb=1, mb=torch.full((n,), 2, dtype=I32))
    live = _live(m, g)
    full, part = torch.empty(m, n, dtype=out), torch.full((m, n), 9, dtype=out)
    kernels.gemm(a, packed, n, epi, full, 2)
    kernels.gemm(a, packed, n, epi, part, 2, live)
    assert torch.equal(part[live.bool()], full[live.bool()]) and bool((part[~live.bool()] == 0).all())


@pytest.mark.parametrize("softmax", [False, True])
def test_bmm_with_live_rows_computes_those_and_zeroes_the_rest(softmax):
    g = torch.Generator().manual_seed(2)
    b1, b2, m, k, n = 3, 2, 30, 32, 30
    a = torch.randint(0, 256, (b1, b2, m, k), generator=g).to(U8)
    b = torch.randint(-128, 128, (b1, b2, k, n), generator=g).to(I8)
    epi = kernels.epilogue("requant", I32, torch.zeros(n, dtype=I32), pre=0, k=8, lo=-2 ** 15, hi=2 ** 15 - 1, zp=0,
                           m=torch.ones(n, dtype=I32), c=torch.zeros(n, dtype=I32))
    sm = None
    if softmax:
        from graphopt.ir.ops.integer import shift_pow2
        pow2 = shift_pow2(torch.arange(0, 14 * 128 + 1), 128, 14).to(I32)
        sm = kernels.softmax(pow2, 128, 14, 8, None, (b1, b2, m, n))
    live = torch.stack([_live(m, g) for _ in range(b1)])
    live[1] = 0                                                     # a batch item with no live row at all
    live = live[:, None, :].expand(b1, b2, m)                       # the heads share it (stride 0)
    dtype = U8 if softmax else I32
    full, part = torch.empty(b1, b2, m, n, dtype=dtype), torch.full((b1, b2, m, n), 9, dtype=dtype)
    kernels.bmm(a, b, 100, False, epi, full, 2, sm)
    kernels.bmm(a, b, 100, False, epi, part, 2, sm, live)
    assert torch.equal(part[live.bool()], full[live.bool()]) and bool((part[~live.bool()] == 0).all())


def test_row_kernels_with_live_rows_compute_those_and_zero_the_rest():
    g = torch.Generator().manual_seed(3)
    rows, c = 50, 40
    x = torch.randint(-20000, 20000, (rows, c), generator=g).to(I32)
    live = _live(rows, g)
    ones, zeros = torch.ones(c, dtype=I32), torch.zeros(c, dtype=I32)
    rq = kernels.epilogue("requant", U8, None, pre=1, k=6, lo=-128, hi=127, zp=128, m=ones, c=zeros)
    add = kernels.epilogue("add", I32, None, pre=0, k=0, lo=-2 ** 31, hi=2 ** 31 - 1, zp=0, m=ones, c=zeros, mb=ones)
    cases = [(lambda y, l: kernels.layernorm(x, 0, 14, 20, None, y, 2, l), I32),
             (lambda y, l: kernels.requant(x, rq, y, 2, l), U8),
             (lambda y, l: kernels.add(x, x.flip(0).contiguous(), add, y, 2, l), I32)]
    for run, dtype in cases:
        full, part = torch.empty(rows, c, dtype=dtype), torch.full((rows, c), 9, dtype=dtype)
        run(full, None)
        run(part, live)
        assert torch.equal(part[live.bool()], full[live.bool()]) and bool((part[~live.bool()] == 0).all())


def test_onnx_runtime_custom_ops_skip_padding_too_and_stay_identical():
    pytest.importorskip("onnxruntime")
    from graphopt.backends.onnx.cpu_integer_ops import to_onnx_custom_ops
    from graphopt.backends.onnxruntime_backend import custom_ops_session

    model = _bert()
    feed = _feed([24, 9, 0, 17, 1])
    graph = _integer(model, feed, [_feed([20, 12, 24, 5, 8], seed=s) for s in (1, 2)])
    onnx_model = to_onnx_custom_ops(graph, threads=2)
    with_live = [n for n in onnx_model.graph.node if n.op_type.startswith("IntGemm") and len(n.input) == 12]
    assert len(with_live) == len([n for n in onnx_model.graph.node if n.op_type.startswith("IntGemm")]) > 0
    session = custom_ops_session(onnx_model, threads=2)
    with torch.inference_mode():
        want = _first(lower(graph, "torch")(**feed))
    for _ in range(2):
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        assert torch.equal(torch.from_numpy(got), want)


def test_reshapes_that_merge_the_batch_with_the_heads_keep_the_rows():
    from graphopt.backends.cpu_integer_rows import _reshaped
    # K^T as the exact ONNX exporter writes it: [B, H, T, D] -> [B H, T, D] -> [B H, D, T] -> [B, H, D, T]
    assert _reshaped((0, 1, 3, 1), (12, 16, 24), (3, 4, 16, 24)) == (0, 4, 2, 1)
    assert _reshaped((0, 4, 1, 1), (3, 4, 24, 16), (12, 24, 16)) == (0, 1, 2, 1)
    assert _reshaped((0, 1, 1, 1), (3, 24, 64), (3, 24, 4, 16)) == (0, 1, 1, 1)      # heads split off: same rows
    assert _reshaped((0, 1, 1, 1), (3, 24 * 64), (3, 24, 64)) == (0, 1, 1, 64)       # tokens merged with columns
    assert _reshaped((0, 1, 1, 1), (72, 64), (3, 24, 64)) is None                    # batch and tokens merged


def test_exact_onnx_exporter_file_skips_every_kernel_and_stays_identical(tmp_path):
    pytest.importorskip("onnxscript")
    model, feed = _bert(), _feed([24, 9, 1, 17])
    path = tmp_path / "bert.onnx"
    torch.onnx.export(model, (feed["input_ids"], feed["attention_mask"]), path, dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    graph = graphopt.optimize(str(path), [("integer_only", {"smoothquant": 0.7}), "zero_padded_positions"],
                              calibration=[_feed([20, 12, 24, 5], seed=1)]).graph
    ex = lower(graph, "cpu_integer", threads=2)     # every GEMM, attention, LayerNorm, requant and add skips padding
    assert ex.report.padding_rows == sum(1 for e in ex.report if e.kernel.split(" ")[0] in
                                         ("cpu.int_gemm", "cpu.int_bmm", "cpu.int_layernorm", "cpu.int_requant",
                                          "cpu.int_add")), str(ex.report)
    with torch.inference_mode():
        want = _first(lower(graph, "torch")(**feed))
        got = _first(ex(**feed))
    assert torch.equal(got, want) and bool((got[~feed["attention_mask"].bool()] == 0).all())
