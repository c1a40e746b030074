"""cpu_integer's kernels as ONNX Runtime custom ops: each fused kernel, written as a custom-domain node and
run by the custom-op library in ONNX Runtime, gives exactly the integers of the reference ops (torch
backend) and of cpu_integer; whole integer models (tiny ViT, a BERT with padding masks) at batch 1 and
more; opt-cli --ort-custom-ops; the portable output stays standard-op only; clear errors."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import graphopt
from graphopt.backends import LoweringError
from graphopt.backends import cpu_integer_library as kernels
from graphopt.ir import Graph, TensorType
from tests.tiny_models import padded_ids, tiny_bert

ort = pytest.importorskip("onnxruntime")
try:
    kernels.library()
except kernels.KernelBuildError as e:       # no C compiler on this machine
    pytest.skip(str(e), allow_module_level=True)

from graphopt.backends.onnx.cpu_integer_ops import DOMAIN, to_onnx_custom_ops, unpack_b  # noqa: E402
from graphopt.backends.onnxruntime_backend import custom_ops_session  # noqa: E402
from graphopt.backends.registry import lower  # noqa: E402
from graphopt.backends.ort_custom_ops import limit_isa  # noqa: E402
from tests.test_cpu_integer import (I8, I32, U8, _broadcast_add_graph, _gen, _layernorm_graph,  # noqa: E402
                                    _linear_graph, _rand, _sibling_linears, _size_term_attention_graph)


@pytest.fixture(params=kernels.available_isas())
def isa(request):
    """Each GEMM instruction set this CPU has, in the custom-op library and in cpu_integer alike."""
    limit_isa(request.param)
    kernels.limit_isa(request.param)
    yield request.param
    limit_isa("amx")
    kernels.limit_isa("amx")


def _run(session, graph: Graph, inputs) -> list[torch.Tensor]:
    names = [i.name for i in session.get_inputs()]
    assert names == [v.name for v in graph.inputs]
    return [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def _check(graph: Graph, inputs, custom_ops: dict[str, int], threads=1):
    """The graph as custom ops: the expected custom nodes, no integer op left as standard ops, outputs equal
    (dtype and value) to the reference backend's and cpu_integer's."""
    model = to_onnx_custom_ops(graph, threads=threads)
    ops = [n.op_type for n in model.graph.node if n.domain == DOMAIN]
    assert {op: ops.count(op) for op in custom_ops} == custom_ops and len(ops) == sum(custom_ops.values()), ops
    assert not {"MatMulInteger", "ConvInteger", "GatherElements"} & {n.op_type for n in model.graph.node}
    got = _run(custom_ops_session(model, threads=threads), graph, inputs)
    want = lower(graph, "torch").run_flat(*inputs)
    also = lower(graph, "cpu_integer", threads=2).run_flat(*inputs)
    for w, a, o in zip(want, also, got, strict=True):
        assert o.dtype == w.dtype and torch.equal(o, w) and torch.equal(a, w)
    return model


# ---- each kernel --------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_dtype,k", [(U8, 64), (I8, 36), (U8, 30)])
def test_linear_requant_and_raw(isa, x_dtype, k):
    """Both 8-bit input types (i8 read as u8 + 128) and a K padded to a multiple of 4."""
    graph, y, x, g = _linear_graph(k=k, x_dtype=x_dtype, bias=True)
    m, c = graph.add_constant(_rand((40,), I32, g, 1, 511)), graph.add_constant(_rand((40,), I32, g, -99, 99))
    graph.set_outputs([graph.call("int.requant", y, m, c, pre=0, k=16, lo=-128, hi=127, zero_point=128, dtype="u8")])
    _check(graph, [x], {"IntGemm_u8": 1})
    graph, y, x, _ = _linear_graph(k=k, x_dtype=x_dtype)
    graph.set_outputs([y])
    _check(graph, [x], {"IntGemm_i32": 1})


@pytest.mark.parametrize("shifts", [[12, 12, 12], [12, 13], [13, 12, 14]])
def test_sibling_linear_layers(shifts):
    """One IntGemm over the concatenated weights, then standard Slice ops; requants that differ in their shift
    pass it per column (ks)."""
    graph, inputs = _sibling_linears(shifts)
    model = _check(graph, inputs, {"IntGemm_i8": 1, "IntBmm_i32": 1})
    assert sum(n.op_type == "Slice" for n in model.graph.node) >= len(shifts)
    gemm = next(n for n in model.graph.node if n.op_type == "IntGemm_i8")
    assert (len(gemm.input) > 10 and gemm.input[10] != "") == (len(set(shifts)) > 1)


@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_shiftgelu_table_epilogues(per_channel):
    graph, y, x, g = _linear_graph()
    m1, c1 = graph.add_constant(_rand((40,), I32, g, 1, 63)), graph.add_constant(torch.tensor(512, dtype=I32))
    h = graph.call("int.requant", y, m1, c1, pre=0, k=10, lo=-32768, hi=32767, zero_point=0, dtype="i32")
    h = graph.call("int.shiftgelu", h, X=128, n=10, bits=12, in_bits=16)
    shape = (40,) if per_channel else ()
    m2, c2 = graph.add_constant(_rand(shape, I32, g, 1, 255)), graph.add_constant(_rand(shape, I32, g, -999, 999))
    graph.set_outputs([graph.call("int.requant", h, m2, c2, pre=8, k=18, lo=-128, hi=127, zero_point=128, dtype="u8")])
    model = _check(graph, [x], {"IntGemm_u8": 1})
    kind = next(a.s for n in model.graph.node for a in n.attribute if a.name == "kind")
    assert kind == (b"table_requant" if per_channel else b"table")
    if per_channel:      # a file written before the gelu_* attributes existed: the library reads them as 0 (table)
        node = next(n for n in model.graph.node if n.op_type == "IntGemm_u8")
        kept = [a for a in node.attribute if not a.name.startswith("gelu_")]
        assert len(kept) == len(node.attribute) - 4
        del node.attribute[:]
        node.attribute.extend(kept)
        want = lower(graph, "torch").run_flat(x)[0]
        assert torch.equal(_run(custom_ops_session(model), graph, [x])[0], want)


@pytest.mark.parametrize("gemm_first", [True, False])
def test_linear_residual_add(gemm_first):
    graph, y, x, g = _linear_graph(bias=True)
    res = graph.add_input("res", TensorType(I32, (3, 11, 40)))
    ma, mb = graph.add_constant(torch.tensor(37, dtype=I32)), graph.add_constant(_rand((40,), I32, g, 1, 255))
    c = graph.add_constant(torch.tensor(-77, dtype=I32))
    args = (y, res, ma, mb) if gemm_first else (res, y, mb, ma)
    pa, pb = (4, 1) if gemm_first else (1, 4)
    graph.set_outputs([graph.call("int.add", *args, c, pa=pa, pb=pb, k=10, lo=-32768, hi=32767, zero_point=0,
                                  dtype="i32")])
    _check(graph, [x, _rand((3, 11, 40), I32, g, -32768, 32767)], {"IntGemm_i32": 1})


@pytest.mark.parametrize("k,masked,rank", [(64, False, 4), (20, True, 4), (24, False, 3)])
def test_attention_bmm_with_shiftmax(k, masked, rank):
    g = _gen(1)
    lead = (2, 3) if rank == 4 else (6,)
    graph = Graph("before")
    q = graph.add_input("q", TensorType(U8, lead + (17, k)))
    kt = graph.add_input("kt", TensorType(I8, lead + (k, 19)))
    mask = graph.add_input("mask", TensorType(torch.bool, (2, 1, 1, 19))) if masked else None
    s = graph.call("int.matmul", q, kt, a_zp=128, b_zp=0)
    s = graph.call("int.requant", s, graph.add_constant(torch.tensor(5, dtype=I32)),
                   graph.add_constant(torch.tensor(1 << 14, dtype=I32)), pre=7, k=15, lo=-32768, hi=32767,
                   zero_point=0, dtype="i32")
    p = graph.call("int.shiftmax", s, mask, X=128, n=14, bits=8)
    v = graph.add_input("v", TensorType(I8, lead + (19, 8)))
    o = graph.call("int.matmul", p, v, a_zp=0, b_zp=0)
    graph.set_outputs([graph.call("int.requant", o, graph.add_constant(torch.tensor(3, dtype=I32)),
                                  graph.add_constant(torch.tensor(0, dtype=I32)), pre=0, k=9, lo=-128, hi=127,
                                  zero_point=128, dtype="u8")])
    inputs = [_rand(lead + (17, k), U8, g), _rand(lead + (k, 19), I8, g)]
    inputs += [torch.rand(2, 1, 1, 19, generator=g) > 0.3] if masked else []
    inputs += [_rand(lead + (19, 8), I8, g)]
    _check(graph, inputs, {"IntBmm_u8": 2})


@pytest.mark.parametrize("masked,term_first,reshaped", [(False, False, True), (True, True, False)])
def test_attention_with_the_size_term_before_the_requant(isa, masked, term_first, reshaped):
    """token_merge before integer_only: int.add of the size term to the accumulator (either operand order: its pa
    and pb swap), the scores' requant and Shiftmax are one IntBmm of kind add_requant."""
    graph, inputs = _size_term_attention_graph(masked, term_first, reshaped)
    model = _check(graph, inputs, {"IntBmm_u8": 1, "IntBmm_i32": 1})
    kinds = [a.s for n in model.graph.node if n.domain == DOMAIN for a in n.attribute if a.name == "kind"]
    assert sorted(kinds) == [b"add_requant", b"raw"]


@pytest.mark.parametrize("X", [96, 128])
def test_masked_shiftmax_row_broadcast_and_fully_masked(X):
    """X = 2^k (shift path) or not (table); the mask broadcasts over rows, or over columns (a [.., R, 1] mask
    the library materializes), and masks a whole batch."""
    g = _gen(2)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (2, 3, 5, 33)))
    mask = graph.add_input("mask", TensorType(torch.bool, (2, 1, 1, 33)))
    rows = graph.add_input("rows", TensorType(torch.bool, (5, 1)))
    graph.set_outputs([graph.call("int.shiftmax", x, mask, X=X, n=12, bits=8),
                       graph.call("int.shiftmax", x, X=X, n=12, bits=8),
                       graph.call("int.shiftmax", x, rows, X=X, n=12, bits=8)])
    keep = torch.rand(2, 1, 1, 33, generator=g) > 0.3
    keep[1] = False
    _check(graph, [_rand((2, 3, 5, 33), I32, g, -3000, 3000), keep, torch.tensor([[True], [False]] * 2 + [[True]])],
           {"IntShiftmax_u8": 3})


def test_layernorm_with_and_without_requant():
    _check(*_layernorm_graph(), {"IntLayerNorm_u8": 1, "IntLayerNorm_i32": 1})


@pytest.mark.parametrize("pos_rows", [(1, 5), (5,), (3, 1), (1, 1)])   # repeated blocks (read in place), or not
def test_standalone_add_with_a_broadcast_operand(pos_rows):
    _check(*_broadcast_add_graph(pos_rows=pos_rows), {"IntAdd_i32": 1})


def test_patch_conv_and_standalone_requant():
    """The patch convolution's im2col and the transpose back stay standard ops around the custom GEMM."""
    g = _gen(4)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(U8, (2, 3, 16, 16)))
    w, b = graph.add_constant(_rand((8, 3, 4, 4), I8, g)), graph.add_constant(_rand((8,), I32, g, -999, 999))
    y = graph.call("int.conv2d", x, w, b, stride=(4, 4), x_zp=128)
    m, c = graph.add_constant(_rand((8, 1, 1), I32, g, 1, 255)), graph.add_constant(_rand((8, 1, 1), I32, g, -99, 99))
    y = graph.call("int.requant", y, m, c, pre=2, k=12, lo=-128, hi=127, zero_point=0, dtype="i8")
    m2, c2 = graph.add_constant(_rand((4,), I32, g, 1, 255)), graph.add_constant(_rand((4,), I32, g, -99, 99))
    graph.set_outputs([graph.call("int.requant", y, m2, c2, pre=0, k=6, lo=-32768, hi=32767, zero_point=0, dtype="i32")])
    _check(graph, [_rand((2, 3, 16, 16), U8, g)], {"IntGemm_i8": 1, "IntRequant_i32": 1})


@pytest.mark.parametrize("C,H,W,ph,pw,dtype", [(3, 16, 16, 4, 4, "u8"), (3, 12, 8, 4, 2, "i8"), (1, 6, 40, 3, 20, "i32")])
def test_quantize_writes_a_vits_patches(C, H, W, ph, pw, dtype):
    """int.quantize -> reshape [B, C, H/ph, ph, W/pw, pw] -> permute (0, 2, 4, 1, 3, 5): IntQuantize writes the patches
    itself (its `patch`), as on cpu_integer, instead of ONNX Runtime copying the image through a 6-D Transpose."""
    g = _gen(16)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(torch.float32, (2, C, H, W)))
    q = graph.call("int.quantize", x, inv_scale=1 / 0.021, zero_point=128 if dtype == "u8" else 0,
                   lo=-128 if dtype != "i32" else -30000, hi=127 if dtype != "i32" else 30000, dtype=dtype)
    p = graph.call("permute", graph.call("reshape", q, shape=(2, C, H // ph, ph, W // pw, pw)), dims=(0, 2, 4, 1, 3, 5))
    graph.set_outputs([graph.call("reshape", p, shape=(2, H // ph * (W // pw), C * ph * pw))])
    values = torch.randn(2, C, H, W, generator=g) * (3 if dtype != "i32" else 300)
    model = _check(graph, [values], {f"IntQuantize_{dtype}": 1})
    assert "Transpose" not in {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("n,k", [(1, 4), (45, 36), (3, 30), (70, 192)])
def test_unpack_b_inverts_pack_b(n, k):
    w = _rand((n, k), I8, _gen(n + k))
    packed, _ = kernels.pack_b(w)
    assert torch.equal(unpack_b(packed, n, k), w)


# ---- whole models -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_graph(tiny_vit_case):
    g = _gen(5)
    calib = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(3)]
    return graphopt.optimize(tiny_vit_case.model, [("integer_only", {"smoothquant": 0.7})], calib[0],
                             calibration=calib).graph


@pytest.mark.parametrize("batch,threads", [(1, 1), (5, 2)])
def test_tiny_vit_bit_identical_to_reference_and_cpu_integer(vit_graph, batch, threads):
    x = torch.randn(batch, 3, 32, 32, generator=_gen(batch))
    model = to_onnx_custom_ops(vit_graph)
    used = {name for n in model.graph.node for name in n.input}
    assert [i.name for i in model.graph.initializer if i.name not in used] == []   # no packed copy left behind
    session = custom_ops_session(model, threads=threads)
    got = _run(session, vit_graph, [x])[0]
    assert torch.equal(got, lower(vit_graph, "torch").run_flat(x)[0])
    assert torch.equal(got, lower(vit_graph, "cpu_integer", threads=2).run_flat(x)[0])


@pytest.fixture(scope="module")
def tome_vit():
    """A small HF ViT and its calibration data."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 image_size=24, patch_size=4, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    g = _gen(7)
    return model, [(torch.randn(4, 3, 24, 24, generator=g),) for _ in range(2)]


@pytest.mark.parametrize("integer_first", [True, False])
def test_token_merged_vit_runs_on_custom_ops_bit_identical(tome_vit, integer_first):
    """Token merging, its proportional attention and the float edges are custom ops: cpu_integer runs no int.* op
    by its reference and the kernel graph keeps none: block 2's proportional attention is in its IntBmm, as the
    Shiftmax's size term, in either order (kind requant); outputs equal the reference's and cpu_integer's, batch 1 and 3,
    repeated on one session."""
    from graphopt.backends.kernels import fusion_rules
    from graphopt.backends.onnx.cpu_integer_ops import kernel_graph
    from graphopt.passes import PassManager

    model, calib = tome_vit
    if integer_first:
        base = graphopt.optimize(model, [("integer_only", {"smoothquant": 0.7})], calib[0], calibration=calib).graph
        graph, _ = PassManager(["token_merge:r=5"]).run(base)
    else:
        graph = graphopt.optimize(model, ["token_merge:r=5", ("integer_only", {"smoothquant": 0.7})], calib[0],
                                  calibration=calib).graph
    cpu = lower(graph, "cpu_integer", threads=2)
    on_reference = {e.nodes.split("(", 1)[1].split(")", 1)[0] for e in cpu.report if e.kernel == "reference"}
    assert on_reference == set(), str(cpu.report)
    left = {op for op in kernel_graph(graph, fusion_rules("cpu_integer").rules).op_counts() if op.startswith("int.")}
    assert left == set()
    onnx_model = to_onnx_custom_ops(graph)
    custom = [n for n in onnx_model.graph.node if n.domain == DOMAIN]
    types = {n.op_type for n in custom}
    assert {"IntTokenMerge_i32", "IntQuantize_u8", "IntDequantize_f32", "IntBmm_u8"} <= types
    assert all(len(n.output) == 2 for n in custom if n.op_type == "IntTokenMerge_i32")
    merges = [n for n in custom if n.op_type == "IntTokenMerge_i32"]      # each sums its keys' heads itself,
    assert merges and all(a.i == 2 for n in merges for a in n.attribute if a.name == "heads_axis")   # in place
    made_by = {o: n.op_type for n in onnx_model.graph.node for o in n.output}
    assert "ReduceSum" not in made_by.values() and {made_by.get(n.input[1]) for n in merges} == {"Reshape"}
    sizes_at = {"IntBmm_u8": 7, "IntShiftmax_u8": 3}                # the input `sizes` of each
    with_sizes = [n for n in custom if n.op_type in sizes_at and len(n.input) > sizes_at[n.op_type]
                  and n.input[sizes_at[n.op_type]]]
    assert [n.op_type for n in with_sizes] == ["IntBmm_u8"]     # block 2's proportional attention, in its kernel
    kind = next(a.s for a in with_sizes[0].attribute if a.name == "kind")
    assert kind == b"requant"      # either order: the term is added to the Shiftmax input, after the scores' requant
    assert not {"MatMulInteger", "Floor", "QuantizeLinear", "DequantizeLinear", "TopK", "ScatterElements",
                "ArgMax"} & {n.op_type for n in onnx_model.graph.node}
    session = custom_ops_session(onnx_model, threads=2)
    reference = lower(graph, "torch")
    for batch in (1, 3, 1, 3):
        x = torch.randn(batch, 3, 24, 24, generator=_gen(batch))
        got = _run(session, graph, [x])[0]
        want = reference.run_flat(x)[0]
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert torch.equal(got, cpu.run_flat(x)[0])


@pytest.mark.parametrize("layout", ["heads_first", "tokens_first", "heads_first_by_permute"])
@pytest.mark.parametrize("key_dtype", [I8, I32])
def test_token_merge_summing_its_keys_per_head(layout, key_dtype):
    """A merge whose keys are the int32 sum over the heads of [B, H, N, d] or [B, N, H, d] keys (as cpu_integer,
    IntTokenMerge sums them itself: heads_axis), the first also as the permute of the second (read in place)."""
    g = _gen(15)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (3, 20, 16)))
    shape = (3, 20, 4, 8) if layout != "heads_first" else (3, 4, 20, 8)
    heads = graph.add_input("heads", TensorType(key_dtype, shape))
    sizes = graph.add_input("sizes", TensorType(I32, (3, 20, 1)))
    keys = graph.op.permute(heads, dims=(0, 2, 1, 3)) if layout == "heads_first_by_permute" else heads
    axis = 2 if layout == "tokens_first" else 1
    summed = graph.op.sum(keys, dims=(axis,), keepdim=False, dtype=I32)
    merged, new_sizes = graph.call("int.token_merge", x, summed, sizes, r=6, protected=1, shift=2)
    graph.set_outputs([merged, new_sizes])
    model = _check(graph, [_rand((3, 20, 16), I32, g, -5000, 5000), _rand(shape, key_dtype, g, -3000, 3000),
                           _rand((3, 20, 1), I32, g, 1, 4)], {"IntTokenMerge_i32": 1})
    assert not {"ReduceSum", "Transpose"} & {n.op_type for n in model.graph.node}
    merge = next(n for n in model.graph.node if n.op_type == "IntTokenMerge_i32")
    assert merge.input[1] == "heads" and [a.i for a in merge.attribute if a.name == "heads_axis"] == [
        1 if layout == "heads_first" else 2]


@pytest.mark.parametrize("sizes_shape", [(2, 1, 5, 33), (2, 1, 1, 33), (2, 3, 5, 1)])
def test_shiftmax_with_proportional_attention(sizes_shape):
    """sizes varying along the columns, the rows, or one per row (broadcast along the row by the library)."""
    g = _gen(12)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (2, 3, 5, 33)))
    sizes = graph.add_input("sizes", TensorType(I32, sizes_shape))
    table = graph.add_constant(torch.tensor([0, 0, 128, 203, 256], dtype=I32))
    graph.set_outputs([graph.call("int.shiftmax", graph.op.add(x, graph.call("int.lookup", sizes, table)), X=96, n=12,
                                  bits=8)])
    _check(graph, [_rand((2, 3, 5, 33), I32, g, -3000, 3000), _rand(sizes_shape, I32, g, -1, 7)],
           {"IntShiftmax_u8": 1})


def test_token_merge_alone_with_8_bit_keys_and_protected_tokens():
    g = _gen(14)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (3, 20, 16)))
    keys = graph.add_input("keys", TensorType(I8, (3, 20, 8)))
    sizes = graph.add_input("sizes", TensorType(I32, (3, 20, 1)))
    merged, new_sizes = graph.call("int.token_merge", x, keys, sizes, r=6, protected=1, shift=1)
    graph.set_outputs([merged, new_sizes])
    _check(graph, [_rand((3, 20, 16), I32, g, -5000, 5000), _rand((3, 20, 8), I8, g), _rand((3, 20, 1), I32, g, 1, 4)],
           {"IntTokenMerge_i32": 1})


def _rounding_sensitive(inv: float) -> torch.Tensor:
    """float32 x (within 8 ulps of (k + 0.5) / inv) where floor(x * inv + 0.5) differs between rounding the product
    first (the reference) and a fused multiply-add (one rounding); found by exact float64 arithmetic."""
    inv32, found = np.float32(inv), []
    for k in range(-300, 300):
        x = down = np.float32((k + 0.5) / np.float64(inv32))
        candidates = [x]
        for _ in range(8):
            x, down = np.nextafter(x, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
            candidates += [x, down]
        for x in candidates:
            exact = np.float64(x) * np.float64(inv32)                    # exact: 24 + 24 bits
            if np.floor(np.float32(np.float32(exact) + np.float32(0.5))) != np.floor(np.float32(exact + 0.5)):
                found.append(x)
    assert found
    return torch.tensor(np.array(found, dtype=np.float32))


@pytest.mark.parametrize("dtype,zp,lo,hi", [("u8", 128, -128, 127), ("i8", 0, -127, 127), ("i32", 0, -32768, 32767)])
def test_quantize_and_dequantize_round_like_the_reference(dtype, zp, lo, hi):
    """.5 cases that a fused multiply-add would round differently, exact halves, clamping; dequantize with a
    per-column scale and offset (multiply, then add) and with a scalar scale."""
    g = _gen(13)
    inv = 1 / 0.037
    graph = Graph("before")
    x = graph.add_input("x", TensorType(torch.float32, (3, 7, 37)))
    q = graph.call("int.quantize", x, inv_scale=inv, zero_point=zp, lo=lo, hi=hi, dtype=dtype)
    scale = graph.add_constant(torch.rand(37, generator=g) * 0.1)
    offset = graph.add_constant(torch.randn(1, 37, generator=g))
    graph.set_outputs([q, graph.call("int.dequantize", q, scale, offset, zero_point=zp),
                       graph.call("int.dequantize", q, graph.add_constant(torch.tensor(0.037)), zero_point=zp)])
    values = (torch.rand(3, 7, 37, generator=g) - 0.5) * 9
    sensitive = _rounding_sensitive(inv)
    halves = torch.tensor([(k + 0.5) / inv for k in range(-40, 40)], dtype=torch.float32)
    special = torch.cat([sensitive, halves, torch.tensor([0.0185, -0.0185, 0.0555, -4.7, 1e6, -1e6, 0.0, -0.0])])
    values.view(-1)[:special.numel()] = special
    fused = {n.op_type for n in _check(graph, [values], {f"IntQuantize_{dtype}": 1, "IntDequantize_f32": 2}).graph.node}
    assert not {"Floor", "Mul", "Add", "Clip"} & fused


def test_the_default_onnx_of_an_integer_graph_stays_standard_ops(vit_graph):
    from graphopt.backends.onnx import to_onnx

    model = to_onnx(vit_graph)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}


def test_bert_with_padding_masks_bit_identical():
    model = tiny_bert(64, layers=2)
    g = _gen(6)

    def batch(n):
        ids, mask = padded_ids(g, n, 12)
        return (), {"input_ids": ids, "attention_mask": mask}

    calib = [batch(4) for _ in range(3)]
    graph = graphopt.optimize(model, [("integer_only", {"smoothquant": 0.7})], calib[0], calibration=calib).graph
    onnx_model = to_onnx_custom_ops(graph)
    assert "IntBmm_u8" in {n.op_type for n in onnx_model.graph.node}
    session = custom_ops_session(onnx_model, threads=2)
    for n in (1, 5):
        _, kw = batch(n)
        inputs = [kw[v.name] for v in graph.inputs]
        want = lower(graph, "torch").run_flat(*inputs)
        for w, o in zip(want, _run(session, graph, inputs), strict=True):
            assert o.dtype == w.dtype and torch.equal(o, w)
    # the heads' Transposes are read and written in place: Q, K^T, V through a_perm / b_perm, the output
    # through out_perm (the outputs above are the check that the strides are right)
    nodes = onnx_model.graph.node
    assert "Transpose" not in {n.op_type for n in nodes}
    perms = [{a.name: list(a.ints) for a in n.attribute if a.name.endswith("perm")} for n in nodes
             if n.op_type == "IntBmm_u8"]
    assert perms == [{"a_perm": [0, 2, 1, 3], "b_perm": [0, 2, 3, 1]},
                     {"b_perm": [0, 2, 1, 3], "out_perm": [0, 2, 1, 3]}] * 2, perms
    # and the output projection's input requant is the second bmm's second requant
    kinds = [next(a.s for a in n.attribute if a.name == "kind") for n in nodes if n.op_type == "IntBmm_u8"]
    assert kinds == [b"requant", b"requant_requant"] * 2


# ---- opt-cli ------------------------------------------------------------------------------------------
def test_opt_cli_writes_the_model_and_library_and_checks_it(tmp_path, capsys):
    from graphopt.cli import main
    from graphopt.zoo import tiny_vit

    x = tiny_vit().args[0].numpy()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((3,) + x.shape).astype(np.float32))
    common = ["--demo", "--calib", str(tmp_path / "calib.npz"), "-p", "integer_only", "-q"]
    assert main(common + ["-o", str(tmp_path / "portable.onnx")]) == 0
    code = main(common + ["-o", str(tmp_path / "out.onnx"), "--ort-custom-ops", "--check", "--runs", "1",
                          "--warmup", "0", "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    library = tmp_path / "out.graphopt_ops.so"
    assert library.is_file()
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["check"]["passed"] and str(library) in report["files_written"]
    # the library next to the model is all a user needs; the outputs are those of the portable model
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    custom = ort.InferenceSession(str(tmp_path / "out.onnx"), options, providers=["CPUExecutionProvider"])
    assert any(n.domain == DOMAIN for n in onnx.load(str(tmp_path / "out.onnx")).graph.node)
    portable = ort.InferenceSession(str(tmp_path / "portable.onnx"), providers=["CPUExecutionProvider"])
    feed = {portable.get_inputs()[0].name: rng.standard_normal(x.shape).astype(np.float32)}
    assert np.array_equal(custom.run(None, feed)[0], portable.run(None, feed)[0])


def test_opt_cli_refuses_custom_ops_without_an_integer_graph(tmp_path, capsys):
    from graphopt.cli import main

    code = main(["--demo", "-o", str(tmp_path / "out.onnx"), "--ort-custom-ops", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "integer_only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


# ---- errors -------------------------------------------------------------------------------------------
def test_a_float_graph_is_refused():
    graph = Graph("float")
    x = graph.add_input("x", TensorType(torch.float32, (2, 4)))
    graph.set_outputs([graph.call("relu", x)])
    with pytest.raises(LoweringError, match="no integer ops"):
        to_onnx_custom_ops(graph)


@pytest.fixture(scope="module")
def kernel_without_custom_op():
    """A cpu.* kernel op the custom-op library does not have (as a kernel added to cpu_integer later)."""
    from graphopt.ir.opdef import register_op

    register_op("cpu.test_only_kernel", inputs=["x"], infer=lambda x: x.with_dtype(U8))(lambda x: x.to(U8))
    return "cpu.test_only_kernel"


def test_a_fusion_to_a_kernel_without_a_custom_op_keeps_the_standard_lowering(kernel_without_custom_op):
    from graphopt.backends.kernels import fusion_rules
    from graphopt.backends.onnx.cpu_integer_ops import CustomOpsEmitter, kernel_graph
    from graphopt.ir.rewrite import Rule

    new_rule = Rule("test_only_requant", lambda op, x, m, c: op("int.requant", x, m, c),
                    lambda op, nodes, x, m, c: op(kernel_without_custom_op, x))
    graph, y, x, g = _linear_graph()
    m, c = graph.add_constant(_rand((40,), I32, g, 1, 511)), graph.add_constant(_rand((40,), I32, g, -99, 99))
    h = graph.call("int.requant", graph.call("relu", y), m, c, pre=0, k=16, lo=-128, hi=127, zero_point=128,
                   dtype="u8")
    graph.set_outputs([h])
    want = lower(graph, "torch").run_flat(x)[0]
    for rules, expected in [([new_rule], "int.requant"), ([new_rule] + fusion_rules("cpu_integer").rules,
                                                          "cpu.int_requant")]:   # the next rule that has one
        lowered = kernel_graph(graph, rules)
        assert lowered.op_counts().get(expected) == 1 and kernel_without_custom_op not in lowered.op_counts()
        session = custom_ops_session(CustomOpsEmitter(lowered, None).build(), threads=1)
        assert torch.equal(_run(session, graph, [x])[0], want)


def test_a_kernel_without_a_custom_op_is_an_error_naming_it(kernel_without_custom_op):
    from graphopt.backends.onnx.cpu_integer_ops import CustomOpsEmitter

    graph = Graph("g")
    x = graph.add_input("x", TensorType(I32, (2, 4)))
    graph.set_outputs([graph.call(kernel_without_custom_op, x)])
    with pytest.raises(LoweringError, match=r"cpu\.test_only_kernel.*no ONNX Runtime custom op"):
        CustomOpsEmitter(graph, None).build()


def _custom_model(op_type, inputs, x_type, y_type=TensorProto.INT32, **attrs):
    x = helper.make_tensor_value_info("x", x_type, [2, 4])
    y = helper.make_tensor_value_info("y", y_type, None)
    m = helper.make_tensor("m", TensorProto.INT32, [4], [1, 1, 1, 1])
    node = helper.make_node(op_type, ["x"] + inputs, ["y"], name="my_node", domain=DOMAIN, **attrs)
    consts = [m, helper.make_tensor("c", TensorProto.INT32, [4], [0] * 4),
              helper.make_tensor("pow2", TensorProto.INT32, [1], [1])]
    graph = helper.make_graph([node], "g", [x], [y], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def test_bad_nodes_are_errors_naming_node_and_op():
    attrs = dict(kind="requant", pre=0, k=0, lo=-100, hi=100, zp=0, threads=1)
    with pytest.raises(LoweringError, match="node 'my_node' IntRequant_i32: the node has no int attribute 'zp'"):
        custom_ops_session(_custom_model("IntRequant_i32", ["m", "c"], TensorProto.INT32,
                                         **{k: v for k, v in attrs.items() if k != "zp"}))
    with pytest.raises(LoweringError, match="node 'my_node' IntRequant_i32: unknown epilogue kind 'fancy'"):
        custom_ops_session(_custom_model("IntRequant_i32", ["m", "c"], TensorProto.INT32, **dict(attrs, kind="fancy")))
    session = custom_ops_session(_custom_model("IntRequant_i32", ["m", "c"], TensorProto.FLOAT, **attrs))
    with pytest.raises(Exception, match="my_node.*IntRequant_i32: x must be uint8, int8 or int32"):
        session.run(None, {"x": np.zeros((2, 4), np.float32)})
    session = custom_ops_session(_custom_model("IntLayerNorm_u8", [], TensorProto.INT32, TensorProto.UINT8,
                                               sh=0, F=13, iters=3, **attrs))
    with pytest.raises(Exception, match=r"my_node.*IntLayerNorm_u8: m is missing \(epilogue kind 'requant' needs"):
        session.run(None, {"x": np.zeros((2, 4), np.int32)})
    with pytest.raises(LoweringError, match=r"my_node.*IntRequant_i32.*input size 2"):   # ONNX Runtime's own check
        custom_ops_session(_custom_model("IntRequant_i32", ["m"], TensorProto.INT32, **attrs))
    with pytest.raises(LoweringError, match="node 'my_node' IntQuantize_u8: the node has no float attribute"):
        custom_ops_session(_custom_model("IntQuantize_u8", [], TensorProto.FLOAT, TensorProto.UINT8, zero_point=0,
                                         lo=-128, hi=127, threads=1))
    session = custom_ops_session(_custom_model("IntShiftmax_u8", ["pow2", "", "m"], TensorProto.INT32,
                                               TensorProto.UINT8, X=1, n_pow=0, bits=8, threads=1))
    with pytest.raises(Exception, match="my_node.*IntShiftmax_u8: sizes and table come together"):
        session.run(None, {"x": np.zeros((2, 4), np.int32)})
    gemm = helper.make_node("IntGemm_i32", ["x", "w", "m"] + [""] * 7 + ["m"], ["y"], name="my_node", domain=DOMAIN,
                            kind="raw", n=4, k_padded=4, flip=0, pb=0, pre=0, k=0, lo=0, hi=0, zp=0, pre2=0, k2=0,
                            lo2=0, hi2=0, zp2=0, threads=1)
    consts = [helper.make_tensor("w", TensorProto.INT8, [4, 4], [1] * 16), helper.make_tensor("m", TensorProto.INT32,
                                                                                              [4], [1] * 4)]
    session = custom_ops_session(helper.make_model(helper.make_graph(
        [gemm], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)], consts),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]))
    with pytest.raises(Exception, match=r"my_node.*IntGemm_i32: ks \(a shift per column\) belongs to a requant"):
        session.run(None, {"x": np.zeros((2, 4), np.uint8)})
    x = helper.make_tensor_value_info("x", TensorProto.INT32, [2, 5, 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in ("y", "s")]
    node = helper.make_node("IntTokenMerge_i32", ["x", "x", "sizes"], ["y", "s"], name="my_node", domain=DOMAIN, r=1,
                            protected=0, shift=0, threads=1)
    sizes = helper.make_tensor("sizes", TensorProto.INT32, [2, 5, 1], [1] * 9 + [0])
    session = custom_ops_session(helper.make_model(helper.make_graph([node], "g", [x], outs, [sizes]), opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]))
    with pytest.raises(Exception, match="my_node.*IntTokenMerge_i32: a token size is below 1"):
        session.run(None, {"x": np.ones((2, 5, 3), np.int32)})


def test_a_bad_permutation_of_a_bmm_is_an_error_naming_it():
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2, 3, 4])
    b = helper.make_tensor_value_info("b", TensorProto.INT8, [1, 2, 4, 3])
    bias = helper.make_tensor("bias", TensorProto.INT32, [3], [0, 0, 0])

    def model(**perm):
        node = helper.make_node("IntBmm_i32", ["a", "b", "bias"], ["y"], name="my_node", domain=DOMAIN, kind="raw",
                                **{k: 0 for k in ("a_zp", "flip_a", "flip_b", "X", "n_pow", "pre", "k", "lo", "hi",
                                                  "zp", "pb", "pre2", "k2", "lo2", "hi2", "zp2")},
                                bits=8, threads=1, **perm)
        y = helper.make_tensor_value_info("y", TensorProto.INT32, None)
        return helper.make_model(helper.make_graph([node], "g", [a, b], [y], [bias]), opset_imports=[
            helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])

    for perm in ({"a_perm": [0, 1, 3, 2]}, {"out_perm": [0, 1, 2]}, {"b_perm": [0, 1, 1, 3]}):
        with pytest.raises(LoweringError, match=f"node 'my_node' IntBmm_i32: {next(iter(perm))} must permute 4 axes"):
            custom_ops_session(model(**perm))
    x, w = np.arange(24, dtype=np.uint8).reshape(1, 2, 3, 4), np.arange(24, dtype=np.int8).reshape(1, 2, 4, 3)
    got = custom_ops_session(model(out_perm=[0, 2, 1, 3])).run(None, {"a": x, "b": w})[0]
    want = (x.astype(np.int64) @ w.astype(np.int64)).transpose(0, 2, 1, 3)
    assert got.shape == (1, 3, 2, 3) and np.array_equal(got, want)


@pytest.mark.parametrize("kind", ["add_requant", "requant_requant"])
def test_a_gemm_of_a_bmm_only_epilogue_kind_is_an_error_naming_it(kind):
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4])
    consts = [helper.make_tensor("w", TensorProto.INT8, [3, 4], [1] * 12),
              helper.make_tensor("bias", TensorProto.INT32, [3], [0] * 3)]
    node = helper.make_node("IntGemm_i32", ["x", "w", "bias"], ["y"], name="my_node", domain=DOMAIN, kind=kind, n=3,
                            k_padded=4, **{a: 0 for a in ("flip", "pb", "pre", "k", "lo", "hi", "zp", "pre2", "k2",
                                                          "lo2", "hi2", "zp2")}, threads=1)
    y = helper.make_tensor_value_info("y", TensorProto.INT32, None)
    session = custom_ops_session(helper.make_model(helper.make_graph([node], "g", [x], [y], consts), opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]))
    with pytest.raises(Exception, match=f"my_node.*IntGemm_i32: epilogue kind '{kind}' is not one of a GEMM"):
        session.run(None, {"x": np.zeros((2, 4), np.uint8)})


def test_an_old_onnxruntime_is_refused_with_its_version(monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.15.1")
    with pytest.raises(LoweringError, match=r"onnxruntime >= 1\.16.*1\.15\.1"):
        custom_ops_session(_custom_model("IntRequant_i32", ["m", "c"], TensorProto.INT32))
