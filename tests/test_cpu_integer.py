"""The cpu_integer backend: each fused kernel against the chain of reference ops it replaces (a small
``before`` graph, the expected kernel op, bit-identical outputs) on every GEMM instruction set this CPU
has; whole integer models identical to the reference backend and to ONNX Runtime; clear errors."""
import pytest
import torch

import graphopt
from graphopt.backends import cpu_integer_library as kernels
from graphopt.ir import Graph, TensorType
from tests.tiny_models import padded_ids, tiny_bert

I32, U8, I8 = torch.int32, torch.uint8, torch.int8

try:
    ISAS = kernels.available_isas()
except kernels.KernelBuildError as e:       # no C compiler on this machine
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(params=ISAS)
def isa(request):
    kernels.limit_isa(request.param)
    yield request.param
    kernels.limit_isa("amx")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, g, lo=None, hi=None):
    info = torch.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    return torch.randint(lo, hi + 1, shape, generator=g).to(dtype)


def _check(graph: Graph, inputs, expected_ops: dict[str, int]):
    """Lower, compare the kernel graph's op counts (integer ops gone) and its outputs with the reference."""
    from graphopt.backends.cpu_integer import lower_to_kernels
    from graphopt.backends.torch_backend import run

    lowered, report = lower_to_kernels(graph, threads=2)
    counts = lowered.op_counts()
    assert {op: counts.get(op, 0) for op in expected_ops} == expected_ops, (counts, report)
    assert not [op for op in counts if op.startswith("int.")], counts
    for want, got in zip(run(graph, *inputs), run(lowered, *inputs)):
        assert want.dtype == got.dtype and torch.equal(want, got)
    return report


# ---- the GEMM itself -------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n", [(1, 4, 1), (13, 8, 45), (33, 64, 31), (70, 192, 65), (40, 128, 32)])
def test_gemm_equals_int64_matmul(isa, m, k, n):
    g = _gen(m * 1000 + n)
    a, w = _rand((m, k), U8, g), _rand((n, k), I8, g)
    bias = _rand((n,), I32, g, -1000, 1000)
    packed, colsum = kernels.pack_b(w)
    out = torch.empty(m, n, dtype=I32)
    kernels.gemm(a, packed, n, kernels.epilogue("raw", I32, (bias - 128 * colsum).to(I32)), out, 2)
    assert torch.equal(out.long(), (a.long() - 128) @ w.long().t() + bias)


def _b_view(b: torch.Tensor, layout: str) -> torch.Tensor:
    """b [B1, B2, K, N] with the same values in another memory layout go_bmm packs by its own path."""
    if layout == "k_contiguous":                                   # a transposed K, as attention's K^T
        return b.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":                                        # neither axis contiguous
        return torch.zeros(b.shape[:2] + (b.shape[2] * 2, b.shape[3] * 3), dtype=b.dtype)[:, :, ::2, ::3].copy_(b)
    return b.contiguous()


@pytest.mark.parametrize("layout", ["n_contiguous", "k_contiguous", "strided"])
@pytest.mark.parametrize("b1,m,k,n,flip", [(1, 1, 5, 3, False), (2, 25, 37, 70, True), (1, 13, 64, 33, False),
                                           (2, 40, 197, 64, True)])
def test_bmm_equals_int64_matmul_for_every_layout_of_b(isa, layout, b1, m, k, n, flip):
    """Ragged M (row blocks plus a tail), K % 4 != 0 (padded k groups; A read in place but for its last
    block), N across partial panels, u8 B read as s8 (flip), A rows strided inside a wider tensor; 3 or 6
    items on 2 threads, so each item is cut into parts of its row blocks."""
    g = _gen(m * 1000 + k + n)
    a = _rand((b1, 3, m, k + 7), U8, g)[..., 3:3 + k]
    b = _b_view(_rand((b1, 3, k, n), U8 if flip else I8, g), layout)
    bias = _rand((n,), I32, g, -1000, 1000)
    out = torch.empty(b1, 3, m, n, dtype=I32)
    kernels.bmm(a, b.view(I8), 100, flip, kernels.epilogue("raw", I32, bias), out, 2)
    b_signed = b.long() - 128 if flip else b.long()
    assert torch.equal(out.long(), (a.long() - 100) @ b_signed + bias)


@pytest.mark.parametrize("b1,m,k,n", [(1, 40, 70, 33), (2, 25, 128, 32), (1, 13, 197, 64)])
def test_bmm_with_zero_columns_of_a_equals_int64_matmul(isa, b1, m, k, n):
    """Attention probabilities times V with masked keys: A (a_zp 0) has columns that are zero in every row,
    or only in some row blocks; the kernel may drop those k (VBMI2), the products must not change."""
    g = _gen(k + n)
    a = _rand((b1, 3, m, k), U8, g)
    a[..., torch.rand(k, generator=g) < 0.6] = 0                 # masked keys: zero in every row
    a[:, :, :12, torch.rand(k, generator=g) < 0.3] = 0           # zero in the first row block only
    b = _b_view(_rand((b1, 3, k, n), I8, g), "n_contiguous")
    bias = _rand((n,), I32, g, -1000, 1000)
    out = torch.empty(b1, 3, m, n, dtype=I32)
    kernels.bmm(a, b, 0, False, kernels.epilogue("raw", I32, bias), out, 2)
    assert torch.equal(out.long(), a.long() @ b.long() + bias)


def test_bmm_writes_a_permuted_output_in_place(isa):
    """out a permuted view ([B, H, T, D] written as [B, T, H, D]), with live rows: dead rows are 0, live ones the
    product."""
    g = _gen(12)
    a, b = _rand((2, 3, 13, 20), U8, g), _rand((2, 3, 20, 16), I8, g)
    bias = _rand((16,), I32, g, -1000, 1000)
    written = torch.full((2, 13, 3, 16), -7, dtype=I32)
    live = (torch.rand(2, 3, 13, generator=g) > 0.4).to(U8)
    kernels.bmm(a, b, 100, False, kernels.epilogue("raw", I32, bias), written.permute(0, 2, 1, 3), 2, live=live)
    want = ((a.long() - 100) @ b.long() + bias) * live[..., None]
    assert torch.equal(written.long(), want.permute(0, 2, 1, 3))
    with pytest.raises(ValueError, match="unit stride along N"):
        kernels.bmm(a, b, 100, False, kernels.epilogue("raw", I32, bias), written.permute(0, 2, 3, 1), 2)


# ---- chains --------------------------------------------------------------------------------------
def _linear_graph(k=64, n=40, rows=(3, 11), x_dtype=U8, bias=False, seed=0):
    g = _gen(seed)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(x_dtype, rows + (k,)))
    w = graph.add_constant(_rand((n, k), I8, g))
    b = graph.add_constant(_rand((n,), I32, g, -5000, 5000)) if bias else None
    y = graph.call("int.linear", x, w, b, x_zp=128 if x_dtype == U8 else 0)
    return graph, y, _rand(rows + (k,), x_dtype, g), g


@pytest.mark.parametrize("x_dtype", [U8, I8])
@pytest.mark.parametrize("k", [64, 36, 30])
def test_linear_requant_becomes_one_gemm(isa, x_dtype, k):
    graph, y, x, g = _linear_graph(k=k, x_dtype=x_dtype)
    m, c = graph.add_constant(_rand((40,), I32, g, 1, 511)), graph.add_constant(_rand((40,), I32, g, -99, 99))
    graph.set_outputs([graph.call("int.requant", y, m, c, pre=0, k=16, lo=-128, hi=127, zero_point=128, dtype="u8")])
    _check(graph, [x], {"cpu.int_gemm": 1})


@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_shiftgelu_requant_folds_into_the_epilogue(isa, per_channel):
    graph, y, x, g = _linear_graph()
    m1, c1 = graph.add_constant(_rand((40,), I32, g, 1, 63)), graph.add_constant(torch.tensor(512, dtype=I32))
    h = graph.call("int.requant", y, m1, c1, pre=0, k=10, lo=-32768, hi=32767, zero_point=0, dtype="i32")
    h = graph.call("int.shiftgelu", h, X=128, n=10, bits=12, in_bits=16)
    shape = (40,) if per_channel else ()
    m2, c2 = graph.add_constant(_rand(shape, I32, g, 1, 255)), graph.add_constant(_rand(shape, I32, g, -999, 999))
    graph.set_outputs([graph.call("int.requant", h, m2, c2, pre=8, k=18, lo=-128, hi=127, zero_point=128, dtype="u8")])
    lowered_kind = "table_requant" if per_channel else "table"
    from graphopt.backends.cpu_integer import lower_to_kernels
    assert lower_to_kernels(graph)[0].find_nodes("cpu.int_gemm")[0].attrs["kind"] == lowered_kind
    _check(graph, [x], {"cpu.int_gemm": 1})



@pytest.mark.parametrize("X,n,bits,in_bits,zp", [(128, 10, 12, 16, 0), (64, 12, 13, 16, -300), (256, 8, 10, 12, 77),
                                                  (96, 10, 12, 16, 0)])
def test_shiftgelu_epilogue_over_its_whole_input_range(isa, X, n, bits, in_bits, zp):
    """The AVX-512 epilogue computes shiftgelu (X a power of two) instead of the table gather: every GEMM output
    y of the first requant's 16-bit range, shifted by its zero point and clamped to in_bits, against the
    reference ops. Rows are all (a0, a1) in u8^2 and columns a0 + 127 a1 + bias, offset to cover [lo, hi];
    X = 96 keeps the table."""
    graph, h, feed = _shiftgelu_over_16_bits(X, n, bits, in_bits, zp)
    one, zero = graph.add_constant(torch.ones(3, dtype=I32)), graph.add_constant(torch.zeros(3, dtype=I32))
    graph.set_outputs([graph.call("int.requant", h, one, zero, pre=0, k=0, lo=-2 ** 31, hi=2 ** 31 - 1, zero_point=0,
                                  dtype="i32")])
    _check(graph, [feed], {"cpu.int_gemm": 1})


def _shiftgelu_over_16_bits(X, n, bits, in_bits, zp):
    """int.linear -> requant (+ zp) -> int.shiftgelu whose GEMM outputs cover the first requant's whole 16-bit range:
    rows are all (a0, a1) in u8^2, columns a0 + 127 a1 + bias. Returns (graph, the shiftgelu value, the feed)."""
    graph = Graph("before")
    x = graph.add_input("x", TensorType(U8, (256 * 256, 4)))
    w = graph.add_constant(torch.tensor([[1, 127, 0, 0]] * 3, dtype=I8))
    y = graph.call("int.linear", x, w, graph.add_constant(torch.tensor([-33000, -16000, 300], dtype=I32)), x_zp=0)
    one, zero = graph.add_constant(torch.ones(3, dtype=I32)), graph.add_constant(torch.zeros(3, dtype=I32))
    h = graph.call("int.requant", y, one, zero, pre=0, k=0, lo=-32768, hi=32767, zero_point=zp, dtype="i32")
    h = graph.call("int.shiftgelu", h, X=X, n=n, bits=bits, in_bits=in_bits)
    a = torch.cartesian_prod(torch.arange(256), torch.arange(256))
    return graph, h, torch.cat([a, torch.zeros(256 * 256, 2, dtype=torch.int64)], 1).to(U8)


@pytest.mark.parametrize("X,n,bits,in_bits,zp,division_free", [(128, 10, 12, 16, 0, True), (64, 8, 11, 14, 5, True),
                                                                (128, 10, 0, 16, 0, False)])
@pytest.mark.parametrize("out,lo,hi,zp2", [("u8", -128, 127, 128), ("i8", -128, 127, 0), ("u8", 0, 255, 0),
                                           ("i32", -2 ** 20, 2 ** 20, 3)])
def test_shiftgelu_epilogue_without_a_division(isa, X, n, bits, in_bits, zp, division_free, out, lo, hi, zp2):
    """The AVX-512 GELU epilogue takes the sigmoid factor from rcp14 and one correction, checked against the exact
    one for every input at each GEMM: with a per-column second requant to bytes (the saturating narrowing where the
    range is [-128, 127]) or int32, every input of the 16-bit range against the reference ops; bits 0 keeps the
    division (A / den + 1/2 can be an integer there)."""
    graph, h, feed = _shiftgelu_over_16_bits(X, n, bits, in_bits, zp)
    m2, c2 = torch.tensor([37, 1, 255], dtype=I32), torch.tensor([5, -999, 0], dtype=I32)
    graph.set_outputs([graph.call("int.requant", h, graph.add_constant(m2), graph.add_constant(c2), pre=8, k=6, lo=lo,
                                  hi=hi, zero_point=zp2, dtype=out)])
    _check(graph, [feed], {"cpu.int_gemm": 1})
    second = {"m": m2, "c": c2, "pre": 8, "k": 6, "lo": lo, "hi": hi, "zp": zp2}
    epi = kernels.epilogue("table_requant", {"u8": U8, "i8": I8, "i32": I32}[out], torch.zeros(3, dtype=I32), lo=-32768,
                           hi=32767, zp=zp, m=torch.ones(3, dtype=I32), c=torch.zeros(3, dtype=I32), second=second,
                           table=torch.zeros(1, dtype=I32), gelu=(X, n, bits, in_bits))
    assert kernels.gelu_division_free(epi) == (division_free and isa != "portable")


@pytest.mark.parametrize("gemm_first", [True, False])
def test_linear_residual_add_becomes_one_gemm(isa, gemm_first):
    graph, y, x, g = _linear_graph(bias=True)
    res = graph.add_input("res", TensorType(I32, (3, 11, 40)))
    ma, mb = graph.add_constant(torch.tensor(37, dtype=I32)), graph.add_constant(_rand((40,), I32, g, 1, 255))
    c = graph.add_constant(torch.tensor(-77, dtype=I32))
    args = (y, res, ma, mb) if gemm_first else (res, y, mb, ma)
    pa, pb = (4, 1) if gemm_first else (1, 4)
    graph.set_outputs([graph.call("int.add", *args, c, pa=pa, pb=pb, k=10, lo=-32768, hi=32767, zero_point=0,
                                  dtype="i32")])
    _check(graph, [x, _rand((3, 11, 40), I32, g, -32768, 32767)], {"cpu.int_gemm": 1})


@pytest.mark.parametrize("kind,out", [("requant", "i8"), ("requant", "i32"), ("table", "i32"), ("add", "u8"),
                                       ("add", "i8")])
def test_every_epilogue_kind_and_output_width(isa, kind, out):
    """Each (kind, 8- or 32-bit output) has its own compiled epilogue: the ones the tests above do not reach."""
    graph, y, x, g = _linear_graph(k=36, n=45, bias=True)
    lo, hi = (-32768, 32767) if out == "i32" else (-128, 127)
    zp = {"u8": 128, "i8": 0, "i32": -7}[out]
    m, c = graph.add_constant(_rand((45,), I32, g, 1, 511)), graph.add_constant(_rand((45,), I32, g, -999, 999))
    feeds = [x]
    if kind == "add":
        res = graph.add_input("res", TensorType(I32, (3, 11, 45)))
        feeds.append(_rand((3, 11, 45), I32, g, -32768, 32767))
        z = graph.call("int.add", y, res, m, c, graph.add_constant(torch.tensor(-77, dtype=I32)), pa=4, pb=2, k=14,
                       lo=lo, hi=hi, zero_point=zp, dtype=out)
    elif kind == "table":
        z = graph.call("int.requant", y, m, c, pre=2, k=14, lo=-1500, hi=1500, zero_point=0, dtype="i32")
        z = graph.call("int.shiftgelu", z, X=128, n=10, bits=12, in_bits=16)
        z = graph.call("int.requant", z, graph.add_constant(torch.tensor(3, dtype=I32)),
                       graph.add_constant(torch.tensor(5, dtype=I32)), pre=4, k=3, lo=lo, hi=hi, zero_point=zp, dtype=out)
    else:
        z = graph.call("int.requant", y, m, c, pre=2, k=12, lo=lo, hi=hi, zero_point=zp, dtype=out)
    graph.set_outputs([z])
    from graphopt.backends.cpu_integer import lower_to_kernels
    assert lower_to_kernels(graph)[0].find_nodes("cpu.int_gemm")[0].attrs["kind"] == kind
    _check(graph, feeds, {"cpu.int_gemm": 1})


def _sibling_linears(shifts: list[int], dtypes: list[str] | None = None):
    """Linear layers with their per-column requants on one input (attention's q, k, v), each requant's shift
    (and output dtype, i8 unless given) given; the outputs are the requants and the product of the first two
    (q k^T, as attention does)."""
    g = _gen(7)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(U8, (2, 9, 36)))
    zps = [128 if d == "u8" else 0 for d in dtypes or ["i8"] * len(shifts)]
    outs = []
    for i, (shift, zp) in enumerate(zip(shifts, zps)):
        w = graph.add_constant(_rand((24 + 8 * i, 36), I8, g))
        b = graph.add_constant(_rand((24 + 8 * i,), I32, g, -5000, 5000)) if i != 1 else None
        y = graph.call("int.linear", x, w, b, x_zp=128)
        m = graph.add_constant(_rand((24 + 8 * i,), I32, g, 1, 511))
        c = graph.add_constant(_rand((24 + 8 * i,), I32, g, -99, 99))
        outs.append(graph.call("int.requant", y, m, c, pre=1, k=shift, lo=-128, hi=127, zero_point=zp,
                               dtype="u8" if zp else "i8"))
    k = graph.call("slice", outs[1], dim=-1, start=8, end=32)
    scores = graph.call("int.matmul", outs[0], graph.call("permute", k, dims=(0, 2, 1)), a_zp=zps[0], b_zp=zps[1])
    graph.set_outputs(outs + [scores])
    return graph, [_rand((2, 9, 36), U8, g)]


def test_linear_layers_of_one_input_with_equal_requants_become_one_gemm(isa):
    graph, inputs = _sibling_linears([12, 12, 12])
    report = _check(graph, inputs, {"cpu.int_gemm": 1, "cpu.int_bmm": 1})
    fused = [e for e in report if e.kernel == "cpu.int_gemm (gemm_siblings_requant)"]
    assert len(fused) == 1 and fused[0].nodes.count("int.linear") == 3, report


def test_sibling_linear_layers_with_different_shifts_share_a_gemm_with_a_shift_per_column(isa):
    from graphopt.backends.cpu_integer_fusions import SIBLINGS
    from graphopt.ir.rewrite import why_not

    graph, inputs = _sibling_linears([12, 13])
    assert "k 13 vs 12" in why_not(graph, SIBLINGS), why_not(graph, SIBLINGS)
    report = _check(graph, inputs, {"cpu.int_gemm": 1})
    assert [e.kernel for e in report if e.kernel.startswith("cpu.int_gemm")] == \
        ["cpu.int_gemm (gemm_siblings_requant_shifts)"], report
    graph, inputs = _sibling_linears([12, 13, 12])         # the two alike share a plain GEMM, the third its own
    report = _check(graph, inputs, {"cpu.int_gemm": 2})
    assert [(e.kernel, e.nodes.count("int.linear")) for e in report if e.kernel.startswith("cpu.int_gemm")] == \
        [("cpu.int_gemm (gemm_siblings_requant)", 2), ("cpu.int_gemm", 1)], report


def test_sibling_linear_layers_with_different_zero_points_are_refused_with_the_reason():
    from graphopt.backends.cpu_integer_fusions import SIBLING_SHIFTS
    from graphopt.ir.rewrite import why_not

    graph, inputs = _sibling_linears([12, 12], ["u8", "i8"])
    assert "zp 0 vs 128, out i8 vs u8" in why_not(graph, SIBLING_SHIFTS), why_not(graph, SIBLING_SHIFTS)
    _check(graph, inputs, {"cpu.int_gemm": 2})


@pytest.mark.parametrize("k,masked", [(64, None), (20, "keys"), (20, "rows alike"), (20, "rows differ")])
def test_attention_scores_requant_shiftmax_become_one_bmm(isa, k, masked):
    """masked: a key padding mask [B, 1, 1, T]; the same stored per query row [B, 1, T, T] (as Hugging Face
    writes it, compacted like the first); one whose rows differ (not compacted)."""
    g = _gen(1)
    graph = Graph("before")
    q = graph.add_input("q", TensorType(U8, (2, 3, 17, k)))
    kt = graph.add_input("kt", TensorType(I8, (2, 3, k, 19)))
    rows = 1 if masked == "keys" else 17
    mask = graph.add_input("mask", TensorType(torch.bool, (2, 1, rows, 19))) if masked else None
    s = graph.call("int.matmul", q, kt, a_zp=128, b_zp=0)
    s = graph.call("int.requant", s, graph.add_constant(_rand((19,), I32, g, 3, 7)),   # per key column
                   graph.add_constant(_rand((19,), I32, g, -(1 << 12), 1 << 12)), pre=7, k=7, lo=-32768, hi=32767,
                   zero_point=0, dtype="i32")
    p = graph.call("int.shiftmax", s, mask, X=128, n=14, bits=8)
    v = graph.add_input("v", TensorType(I8, (2, 3, 19, 8)))
    o = graph.call("int.matmul", p, v, a_zp=0, b_zp=0)
    graph.set_outputs([graph.call("int.requant", o, graph.add_constant(torch.tensor(3, dtype=I32)),
                                  graph.add_constant(torch.tensor(0, dtype=I32)), pre=0, k=9, lo=-128, hi=127,
                                  zero_point=128, dtype="u8")])
    inputs = [_rand((2, 3, 17, k), U8, g), _rand((2, 3, k, 19), I8, g)]
    if masked:       # a key padding mask: the scores kernel drops the masked keys; item 1 has none left
        keep = torch.rand(2, 1, 1, 19, generator=g) > 0.3
        keep[1] = False
        keep = keep.expand(2, 1, rows, 19).contiguous()
        if masked == "rows differ":
            keep[0, 0, 16, :3] = ~keep[0, 0, 16, :3]
        inputs.append(keep)
    inputs += [_rand((2, 3, 19, 8), I8, g)]
    _check(graph, inputs, {"cpu.int_bmm": 2, "cpu.int_shiftmax": 0})


@pytest.mark.parametrize("dims,permutes", [((0, 2, 1, 3), 0), ((0, 2, 3, 1), 1)])   # last axis moved: not folded
def test_attention_output_permute_is_written_by_the_bmm(isa, dims, permutes):
    """probabilities x V, requant, then the heads merged back ([B, H, T, D] -> [B, T, H D]): the permute goes
    into the kernel (out_perm) and the reshape after it is a view."""
    g = _gen(13)
    graph = Graph("before")
    p = graph.add_input("p", TensorType(U8, (2, 3, 17, 19)))
    v = graph.add_input("v", TensorType(I8, (2, 3, 19, 8)))
    o = graph.call("int.requant", graph.call("int.matmul", p, v, a_zp=0, b_zp=0),
                   graph.add_constant(torch.tensor(3, dtype=I32)), graph.add_constant(torch.tensor(0, dtype=I32)),
                   pre=0, k=9, lo=-128, hi=127, zero_point=128, dtype="u8")
    permuted = graph.op.permute(o, dims=dims)
    graph.set_outputs([graph.op.reshape(permuted, shape=(2, -1, 24 if permutes == 0 else 17))])
    _check(graph, [_rand((2, 3, 17, 19), U8, g), _rand((2, 3, 19, 8), I8, g)],
           {"cpu.int_bmm": 1, "permute": permutes})


@pytest.mark.parametrize("per_column", [True, False])
def test_attention_output_requant_joins_the_bmm(isa, per_column):
    """... then the output projection's input requant (per column of the merged heads, or per tensor): it becomes
    the bmm's second requant (kind requant_requant, each head reading its own 8 columns) and its report entry
    joins the attention's."""
    g = _gen(14)
    graph = Graph("before")
    p = graph.add_input("p", TensorType(U8, (2, 3, 17, 19)))
    v = graph.add_input("v", TensorType(I8, (2, 3, 19, 8)))
    o = graph.call("int.requant", graph.call("int.matmul", p, v, a_zp=0, b_zp=0),
                   graph.add_constant(torch.tensor(3, dtype=I32)), graph.add_constant(torch.tensor(-900, dtype=I32)),
                   pre=0, k=9, lo=-128, hi=127, zero_point=128, dtype="u8")
    merged = graph.op.reshape(graph.op.permute(o, dims=(0, 2, 1, 3)), shape=(2, 17, 24))
    m = _rand((24,) if per_column else (), I32, g, 1, 255)
    c = _rand((24,) if per_column else (), I32, g, -(1 << 14), 1 << 14)
    graph.set_outputs([graph.call("int.requant", merged, graph.add_constant(m), graph.add_constant(c), pre=1, k=7,
                                  lo=-128, hi=127, zero_point=0, dtype="i8")])
    report = _check(graph, [_rand((2, 3, 17, 19), U8, g), _rand((2, 3, 19, 8), I8, g)],
                    {"cpu.int_bmm": 1, "cpu.int_requant": 0, "permute": 0})
    assert [e.kernel for e in report] == ["cpu.int_bmm"] and str(report[0].nodes).count("int.requant") == 2


@pytest.mark.parametrize("X", [96, 128])
def test_masked_shiftmax_with_x_a_power_of_two_or_not(isa, X):
    """X = 2^k takes the shift path, other X the table; the mask broadcasts and masks whole rows too. Rows of 70:
    64 columns four vectors at a time, then a ragged tail of 6."""
    g = _gen(2)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (2, 3, 5, 70)))
    mask = graph.add_input("mask", TensorType(torch.bool, (2, 1, 1, 70)))
    graph.set_outputs([graph.call("int.shiftmax", x, mask, X=X, n=12, bits=8),
                       graph.call("int.shiftmax", x, X=X, n=12, bits=8)])
    keep = torch.rand(2, 1, 1, 70, generator=g) > 0.3
    keep[1] = False                                          # a fully masked batch: all zeros
    _check(graph, [_rand((2, 3, 5, 70), I32, g, -3000, 3000), keep], {"cpu.int_shiftmax": 2})



def _layernorm_graph(C=48):
    """Integer LayerNorm with a requant after it and without: the graph and an input with a constant row."""
    g = _gen(3)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (4, 10, C)))
    y = graph.call("int.layernorm", x, C=C, sh=5, F=13, iters=20)
    m, c = graph.add_constant(_rand((C,), I32, g, 1, 1023)), graph.add_constant(_rand((C,), I32, g, -999, 999))
    graph.set_outputs([graph.call("int.requant", y, m, c, pre=0, k=20, lo=-128, hi=127, zero_point=128, dtype="u8"),
                       graph.call("int.layernorm", x, C=C, sh=0, F=13, iters=3)])
    inputs = [_rand((4, 10, C), I32, g, -32768, 32767)]
    inputs[0][0, 0] = 7                                   # a constant row: variance 0 -> max(., 1)
    return graph, inputs


def _rows_by_variance(C=6, rows=40000, seed=5):
    """Rows of C small values whose int.layernorm variance (sh 0: the sum of squared deviations from the truncated
    mean) is 1, 2 or 3, a square, or one below a square (where the isqrt's Newton steps alternate between s and
    s + 1 instead of stopping, so the answer depends on how many steps are left), 8 of each kind where found."""
    x = _rand((rows, C), I32, _gen(seed), -60, 60)
    x[: rows // 8] = _rand((rows // 8, C), I32, _gen(seed), -1, 1)         # variances of a few units
    d = x - torch.div(x.sum(1, keepdim=True), C, rounding_mode="trunc")
    var = (d * d).sum(1)
    s = var.double().sqrt().floor().long()
    kinds = [var <= 3, (s * s == var) & (var > 3), ((s + 1) * (s + 1) - 1 == var) & (var > 3)]
    picked = torch.cat([torch.nonzero(k).flatten()[:8] for k in kinds])
    assert len(picked) == 24
    return x[picked]


@pytest.mark.parametrize("iters", [20, 18, 17, 9])    # the sqrt shortcut (iters >= 18) and the steps themselves
def test_layernorm_isqrt_at_small_squares_and_alternating_values(isa, iters):
    x = _rows_by_variance()
    graph = Graph("before")
    inp = graph.add_input("x", TensorType(I32, tuple(x.shape)))
    graph.set_outputs([graph.call("int.layernorm", inp, C=x.shape[1], sh=0, F=13, iters=iters)])
    _check(graph, [x], {"cpu.int_layernorm": 1})


def _broadcast_add_graph(C=16, pos_rows=(1, 5)):
    """A standalone int.add of an activation [3, 5, C] and a broadcast constant (a position embedding)."""
    g = _gen(7)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (3, 5, C)))
    pos = graph.add_constant(_rand((*pos_rows, C), I32, g, -32768, 32767))
    ma, mb = graph.add_constant(_rand((C,), I32, g, 1, 255)), graph.add_constant(torch.tensor(77, dtype=I32))
    c = graph.add_constant(torch.tensor(3, dtype=I32))
    graph.set_outputs([graph.call("int.add", x, pos, ma, mb, c, pa=2, pb=0, k=9, lo=-32768, hi=32767, zero_point=0,
                                  dtype="i32")])
    return graph, [_rand((3, 5, C), I32, g, -32768, 32767)]


@pytest.mark.parametrize("C", [48, 37, 5])       # whole 16-lane groups, a ragged tail, less than one group
def test_layernorm_requant_becomes_one_kernel(isa, C):
    _check(*_layernorm_graph(C), {"cpu.int_layernorm": 2})


_WIDE = 2**31 - 1


@pytest.mark.parametrize("pre,lo,hi,zp,dtype", [(3, -128, 127, 128, "u8"), (10, -128, 127, 0, "i8"),
                                                 (7, 0, 255, 0, "u8"), (31, -128, 127, 128, "u8"),
                                                 (12, -2**20, 2**20, 5, "i32")])
def test_layernorm_requant_with_a_pre_shift_wide_rows_and_each_output(isa, pre, lo, hi, zp, dtype):
    """The kernel folds the requant's tdiv by 2^pre into the division's shift (which may reach 64: a 0 quotient),
    squares |y| rounded instead of y, unless y +- half wraps in int32 (rows at the edge of int32): against the op."""
    C, g = 85, _gen(pre)                                 # 64 columns 4 vectors at a time, 16, then 5
    x = _rand((6, 5, C), I32, g, -32768, 32767)
    half = 2**4                                           # sh 5
    x[0, 0] = torch.tensor([_WIDE - half, -_WIDE + half] * 42 + [0])          # |y| = 2^31 - 1 - half: no wrap
    x[0, 1] = torch.tensor([_WIDE - half + 1, -_WIDE + half - 1] * 42 + [0])  # one more: y + half wraps
    x[0, 2] = torch.tensor([_WIDE, -_WIDE - 1] * 42 + [5])                      # y itself wraps
    x[0, 3] = _rand((C,), I32, g, -2**30, 2**30)
    graph = Graph("before")
    inp = graph.add_input("x", TensorType(I32, tuple(x.shape)))
    y = graph.call("int.layernorm", inp, C=C, sh=5, F=13, iters=20)
    m, c = graph.add_constant(_rand((C,), I32, g, 1, 2**16)), graph.add_constant(_rand((C,), I32, g, -2**20, 2**20))
    graph.set_outputs([graph.call("int.requant", y, m, c, pre=pre, k=9, lo=lo, hi=hi, zero_point=zp, dtype=dtype)])
    _check(graph, [x], {"cpu.int_layernorm": 1})


@pytest.mark.parametrize("C", [16, 21])
@pytest.mark.parametrize("pos_rows", [(1, 5), (5,), (3, 1), (1, 1)])   # repeated blocks (read in place), or not
def test_standalone_residual_add_with_a_broadcast_operand(isa, C, pos_rows):
    _check(*_broadcast_add_graph(C, pos_rows), {"cpu.int_add": 1})


@pytest.mark.parametrize("dtype", [U8, I8, I32])
def test_standalone_requant_of_each_input_type(isa, dtype):
    """A per-column requant (its consumer is not a kernel) of 8- and 32-bit data over a ragged row of 21."""
    g = _gen(11)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(dtype, (6, 21)))
    m, c = graph.add_constant(_rand((21,), I32, g, 1, 4095)), graph.add_constant(_rand((21,), I32, g, -9999, 9999))
    graph.set_outputs([graph.call("int.requant", x, m, c, pre=3, k=11, lo=-128, hi=127, zero_point=0, dtype="i8")])
    x = _rand((6, 21), dtype, g) if dtype != I32 else _rand((6, 21), I32, g, -(1 << 20), 1 << 20)   # no int32 overflow
    _check(graph, [x], {"cpu.int_requant": 1})


@pytest.mark.parametrize("per_tensor", [True, False])
def test_per_tensor_requant_runs_under_the_layout_ops_it_follows(isa, per_tensor):
    """Token merging's keys: int32 k [B, T, H d] -> [B, H, d, T] -> requant to i8. With one m and one c the requant
    runs on the contiguous [B, T, H d] source and the layout ops follow it; per-column constants stay put."""
    from graphopt.backends.cpu_integer import lower_to_kernels
    g = _gen(12)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (2, 7, 12)))
    t = graph.call("permute", graph.call("reshape", x, shape=(2, 7, 3, 4)), dims=(0, 2, 3, 1))
    n = 7
    shape = () if per_tensor else (n,)
    m, c = graph.add_constant(_rand(shape, I32, g, 1, 4095)), graph.add_constant(_rand(shape, I32, g, -9999, 9999))
    graph.set_outputs([graph.call("int.requant", t, m, c, pre=2, k=13, lo=-128, hi=127, zero_point=0, dtype="i8")])
    _check(graph, [_rand((2, 7, 12), I32, g, -(1 << 20), 1 << 20)], {"cpu.int_requant": 1})
    requant = lower_to_kernels(graph)[0].find_nodes("cpu.int_requant")[0]
    assert (requant.inputs[0].producer is None) == per_tensor   # the graph input itself, or the permute

def test_standalone_requant_and_patch_conv(isa):
    g = _gen(4)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(U8, (2, 3, 16, 16)))
    w, b = graph.add_constant(_rand((8, 3, 4, 4), I8, g)), graph.add_constant(_rand((8,), I32, g, -999, 999))
    y = graph.call("int.conv2d", x, w, b, stride=(4, 4), x_zp=128)
    m, c = graph.add_constant(_rand((8, 1, 1), I32, g, 1, 255)), graph.add_constant(_rand((8, 1, 1), I32, g, -99, 99))
    y = graph.call("int.requant", y, m, c, pre=2, k=12, lo=-128, hi=127, zero_point=0, dtype="i8")
    m2, c2 = graph.add_constant(_rand((4,), I32, g, 1, 255)), graph.add_constant(_rand((4,), I32, g, -99, 99))
    graph.set_outputs([graph.call("int.requant", y, m2, c2, pre=0, k=6, lo=-32768, hi=32767, zero_point=0, dtype="i32")])
    _check(graph, [_rand((2, 3, 16, 16), U8, g)], {"cpu.int_gemm": 1, "cpu.int_requant": 1})


def _merge_graph(x_shape: tuple, key_shape: tuple, r: int, protected: int, shift: int, key_dtype=I32) -> Graph:
    """One int.token_merge of x [B, N, C] (int32), keys ``key_shape`` and sizes [B, N, 1]; outputs both results."""
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, x_shape))
    k = graph.add_input("k", TensorType(key_dtype, key_shape))
    s = graph.add_input("s", TensorType(I32, x_shape[:2] + (1,)))
    merged, sizes = graph.create_node("int.token_merge", [x, k, s], {"r": r, "protected": protected,
                                                                      "shift": shift}).outputs
    graph.set_outputs([merged, sizes])
    return graph


# ---- token merging: the merge, proportional attention inside the attention kernel ------------------------
@pytest.mark.parametrize("batch,n,r,protected,shift,key_range,key_dtype,dim", [
    (1, 19, 5, 1, 0, 1, I32, 5),        # odd token count, keys in {-1, 0, 1}: many tied scores
    (3, 24, 9, 2, 0, 120, I8, 5),       # even count, two protected tokens, int8 keys
    (2, 17, 100, 1, 3, 3000, I32, 5),   # r larger than half: clamped to (n - protected) // 2; shifted keys
    (2, 16, 3, 0, 0, 2 ** 15, I32, 5),  # |a.b| >= 2^21: the scores' exact int64 path
    (1, 40, 12, 1, 0, 2, I32, 5),       # estimated scores over two 16-lane blocks of B tokens, many ties
    (2, 21, 4, 1, 0, 20000, I32, 5),    # estimated, but rows with |a.b| >= 2^21 are scored exactly throughout
    (2, 9, 0, 1, 0, 5, I32, 5),         # r = 0: unchanged
    (2, 197, 16, 1, 0, 40, I32, 64),    # DeiT-S's merge: 98 B tokens (a 64-token block of VPDPWSSD, then 16s)
    (1, 150, 20, 1, 0, 9, I32, 7),      # an odd key width (the last int16 pair padded)
])
def test_token_merge_becomes_one_kernel(batch, n, r, protected, shift, key_range, key_dtype, dim):
    g = _gen(n + r)
    graph = _merge_graph((batch, n, 6), (batch, n, dim), r, protected, shift, key_dtype)
    lo = -min(key_range, 128) if key_dtype == I8 else -key_range
    inputs = [_rand((batch, n, 6), I32, g, -32768, 32767), _rand((batch, n, dim), key_dtype, g, lo, min(key_range, 127)),
              _rand((batch, n, 1), I32, g, 1, 7)]
    _check(graph, inputs, {"cpu.int_token_merge": 1})


def test_token_merge_of_large_tokens_and_sizes_rounds_like_the_reference():
    """Sums x s past 2^50 (int32 tokens, sizes to 2^22): the merge's float64 division is exact only while 2|sum| +
    size < 2^53, and the kernel keeps it to sums below 2^50; those columns take the integer division, smaller ones
    in the same rows stay on the vector path."""
    g = _gen(3)
    graph = _merge_graph((2, 40, 21), (2, 40, 4), 15, 1, 0)
    tokens = _rand((2, 40, 21), I32, g, -2 ** 31, 2 ** 31 - 1)
    tokens[:, :, 8:] //= 1 << 12                                     # columns 8.. below 2^50 even when summed
    _check(graph, [tokens, _rand((2, 40, 4), I32, g, -3, 3), _rand((2, 40, 1), I32, g, 1, 1 << 22)],
           {"cpu.int_token_merge": 1})
    # a hand-found pair where float64 is off by one: (1172080245 * 658314063 + 184609148) / 658314064 rounds to
    # 1172080243 (x * s sums to 2^59.4, beyond float64's 53 bits), float64 gives 1172080244
    graph = _merge_graph((1, 2, 9), (1, 2, 2), 1, 0, 0)
    tokens = torch.tensor([[[1172080245] * 9, [184609148] * 9]], dtype=I32)
    inputs = [tokens, torch.ones(1, 2, 2, dtype=I32), torch.tensor([[[658314063], [1]]], dtype=I32)]
    _check(graph, inputs, {"cpu.int_token_merge": 1})
    from graphopt.backends.torch_backend import run
    assert run(graph, *inputs)[0].flatten().tolist() == [1172080243] * 9      # the hand-computed rounding


def test_token_merge_of_keys_past_int16_estimates_with_32_bit_products():
    """One token's key is 40000 (>= 2^15: no int16 pairs for VPDPWSSD), the others at most 50 (one-wide keys): the
    dots stay below 2^21, so rows are estimated from 32-bit multiplies (vpmulld) before the exact scores."""
    g = _gen(5)
    graph = _merge_graph((2, 41, 6), (2, 41, 1), 12, 1, 0)
    keys = _rand((2, 41, 1), I32, g, -50, 50)
    keys[:, 7] = 40000
    _check(graph, [_rand((2, 41, 6), I32, g, -32768, 32767), keys, _rand((2, 41, 1), I32, g, 1, 7)],
           {"cpu.int_token_merge": 1})


def test_token_merge_when_every_score_is_negative():
    """Keys of A (5, 0) against B (-10, y): every score is negative; the best is B1 (y = 3, -100/109 of 2^20),
    found among five B tokens of a 16-lane vector whose unused lanes must not count as a score of 0."""
    graph = _merge_graph((1, 10, 3), (1, 10, 2), 2, 0, 0)
    keys = torch.tensor([[[5, 0], [-10, 0], [5, 0], [-10, 3], [5, 0], [-10, 1], [5, 0], [-10, 2], [5, 0], [-10, 0]]],
                        dtype=I32)
    inputs = [torch.arange(30, dtype=I32).reshape(1, 10, 3) * 100, keys, torch.ones(1, 10, 1, dtype=I32)]
    _check(graph, inputs, {"cpu.int_token_merge": 1})
    from graphopt.backends.torch_backend import run
    assert run(graph, *inputs)[1].flatten().tolist() == [1, 3, 1, 1, 1, 1, 1, 1]   # B0, then B1 with A0 and A1


def test_token_merge_tie_of_scores_a_fraction_apart_goes_to_the_first():
    """A0 = (1, 0) scores 2^20 (1500^2 / (1500^2 + 1)) = 1048575.53 with B0 = (1500, 1) and 1048575.74 with
    B1 = (2000, 1): both floor to 1048575, so B0 (the first) is its match, though B1's real score is higher."""
    graph = _merge_graph((1, 4, 3), (1, 4, 2), 1, 0, 0)
    keys = torch.tensor([[[1, 0], [1500, 1], [0, 1], [2000, 1]]], dtype=I32)
    _check(graph, [torch.arange(12, dtype=I32).reshape(1, 4, 3) * 10, keys, torch.ones(1, 4, 1, dtype=I32)],
           {"cpu.int_token_merge": 1})
    from graphopt.backends.torch_backend import run
    assert run(graph, torch.arange(12, dtype=I32).reshape(1, 4, 3) * 10, keys, torch.ones(1, 4, 1, dtype=I32))[1] \
        .flatten().tolist() == [2, 1, 1]                      # A0 joined B0: sizes [B0 + A0, A1, B1]


def test_token_merge_kernel_refuses_sizes_below_one():
    from graphopt.backends.cpu_integer_tokens import token_merge
    x, keys, sizes = torch.zeros(1, 5, 2, dtype=I32), torch.ones(1, 5, 3, dtype=I32), torch.ones(1, 5, 1, dtype=I32)
    sizes[0, 1] = 0
    with pytest.raises(ValueError, match="size is below 1"):
        token_merge(x, keys, sizes, 2, 1, 0, 1)


def _size_lookup(graph, batch, n, g):
    """The proportional-attention term of integer token merging: int.lookup(sizes [B, 1, 1, N], log2 table)."""
    sizes = graph.add_input("sizes", TensorType(I32, (batch, 1, 1, n)))
    return sizes, graph.call("int.lookup", sizes, _log_table(graph)), _rand((batch, 1, 1, n), I32, g, -2, 14)  # clamped


def _log_table(graph):
    """token merging's proportional-attention table: round(128 log2(size)) for sizes 0 (as 1) to 11."""
    sizes = torch.arange(12, dtype=torch.float64).clamp_min(1)
    return graph.add_constant(torch.round(128 * torch.log2(sizes)).to(I32))


@pytest.mark.parametrize("masked,lookup_first", [(False, False), (True, True)])
def test_attention_with_proportional_attention_stays_one_bmm(isa, masked, lookup_first):
    g = _gen(11)
    graph = Graph("before")
    q = graph.add_input("q", TensorType(U8, (2, 3, 17, 64)))
    kt = graph.add_input("kt", TensorType(I8, (2, 3, 64, 19)))
    mask = graph.add_input("mask", TensorType(torch.bool, (2, 1, 1, 19))) if masked else None
    sizes, bias, size_values = _size_lookup(graph, 2, 19, g)
    s = graph.call("int.matmul", q, kt, a_zp=128, b_zp=0)
    s = graph.call("int.requant", s, graph.add_constant(torch.tensor(5, dtype=I32)),
                   graph.add_constant(torch.tensor(1 << 14, dtype=I32)), pre=7, k=15, lo=-32768, hi=32767,
                   zero_point=0, dtype="i32")
    p = graph.call("int.shiftmax", graph.op.add(*((bias, s) if lookup_first else (s, bias))), mask, X=128, n=14, bits=8)
    v = graph.add_input("v", TensorType(I8, (2, 3, 19, 8)))
    graph.set_outputs([graph.call("int.matmul", p, v, a_zp=0, b_zp=0)])
    inputs = [_rand((2, 3, 17, 64), U8, g), _rand((2, 3, 64, 19), I8, g)]
    inputs += [torch.rand(2, 1, 1, 19, generator=g) > 0.3] if masked else []
    _check(graph, inputs + [size_values, _rand((2, 3, 19, 8), I8, g)], {"cpu.int_bmm": 2, "cpu.int_shiftmax": 0})


def _size_term_attention_graph(masked, term_first, reshaped, per_row=False, n=19):
    """Attention as token_merge before integer_only makes it: the size term joins the matmul's int32 accumulator by
    an int.add (its own per-column multipliers), then the scores' requant, Shiftmax, the matmul with v; and inputs.
    n keys."""
    g = _gen(14)
    graph = Graph("before")
    q = graph.add_input("q", TensorType(U8, (2, 3, 17, 64)))
    kt = graph.add_input("kt", TensorType(I8, (2, 3, 64, n)))
    mask = graph.add_input("mask", TensorType(torch.bool, (2, 1, 1, n))) if masked else None
    sizes = graph.add_input("sizes", TensorType(I32, (2, n, 1) if reshaped else (2, 1, 17 if per_row else 1, n)))
    term = graph.call("int.lookup", sizes, _log_table(graph))
    term = graph.op.reshape(term, shape=(2, 1, 1, n)) if reshaped else term
    const = lambda lo, hi, shape=(n,): graph.add_constant(_rand(shape, I32, g, lo, hi))  # noqa: E731
    s = graph.call("int.matmul", q, kt, a_zp=128, b_zp=0)
    ma, mb, c = const(64, 255), const(256, 1023), const(-(1 << 14), 1 << 14, (1, n))
    s = graph.call("int.add", *((term, s, mb, ma) if term_first else (s, term, ma, mb)), c, pa=2 if term_first else 1,
                   pb=1 if term_first else 2, k=12, lo=-32768, hi=32767, zero_point=0, dtype="i32")
    s = graph.call("int.requant", s, const(4096, 8191), graph.add_constant(torch.tensor(1 << 14, dtype=I32)), pre=4,
                   k=15, lo=-32768, hi=32767, zero_point=0, dtype="i32")
    p = graph.call("int.shiftmax", s, mask, X=128, n=14, bits=8)
    v = graph.add_input("v", TensorType(I8, (2, 3, n, 8)))
    graph.set_outputs([graph.call("int.matmul", p, v, a_zp=0, b_zp=0)])
    inputs = [_rand((2, 3, 17, 64), U8, g), _rand((2, 3, 64, n), I8, g)]
    inputs += [torch.rand(2, 1, 1, n, generator=g) > 0.3] if masked else []
    inputs += [_rand(tuple(sizes.type.shape), I32, g, -2, 14), _rand((2, 3, n, 8), I8, g)]   # sizes clamped both ends
    return graph, inputs


@pytest.mark.parametrize("masked,term_first,reshaped,per_row,n", [(False, False, True, False, 19),
                                                                   (True, True, False, False, 19),
                                                                   (False, False, False, True, 19),
                                                                   (True, False, False, False, 70)])
def test_size_term_added_before_the_requant_stays_one_bmm(isa, masked, term_first, reshaped, per_row, n):
    """token_merge before integer_only: the size term joins the matmul's int32 accumulator by an int.add (its own
    multipliers), then the scores' requant, then Shiftmax: one attention kernel, per-column constants. per_row: a
    size term of its own for each query row (the kernel then prepares it row by row). n 70: the logits four vectors
    at a time, then a ragged tail."""
    graph, inputs = _size_term_attention_graph(masked, term_first, reshaped, per_row, n)
    report = _check(graph, inputs, {"cpu.int_bmm": 2, "cpu.int_shiftmax": 0, "cpu.int_add": 0, "cpu.int_requant": 0})
    assert [e.kernel for e in report] == ["cpu.int_bmm", "cpu.int_bmm"], str(report)


def test_size_term_add_with_a_runtime_multiplier_stays_unfused_with_a_reason():
    """The rule refuses (and says why) an int.add whose multiplier is a runtime value: no per-column constant."""
    graph = Graph("before")
    q = graph.add_input("q", TensorType(U8, (1, 2, 5, 8)))
    kt = graph.add_input("kt", TensorType(I8, (1, 2, 8, 7)))
    sizes = graph.add_input("sizes", TensorType(I32, (1, 1, 1, 7)))
    ma = graph.add_input("ma", TensorType(I32, ()))
    one = graph.add_constant(torch.tensor(1, dtype=I32))
    s = graph.call("int.add", graph.call("int.matmul", q, kt, a_zp=128, b_zp=0),
                   graph.call("int.lookup", sizes, graph.add_constant(torch.tensor([0, 128, 203], dtype=I32))), ma, one,
                   one, pa=0, pb=0, k=0, lo=-32768, hi=32767, zero_point=0, dtype="i32")
    s = graph.call("int.requant", s, one, one, pre=0, k=0, lo=-32768, hi=32767, zero_point=0, dtype="i32")
    graph.set_outputs([graph.call("int.shiftmax", s, X=128, n=14, bits=8)])
    from graphopt.backends.cpu_integer import lower_to_kernels
    from graphopt.backends.kernels import fusion_rules
    from graphopt.ir.rewrite import why_not_at
    shiftmax = graph.outputs[0].producer
    why = why_not_at(graph, shiftmax, [r for r in fusion_rules("cpu_integer").rules
                                       if r.name == "bmm_add_size_bias_requant_shiftmax"])
    assert "ma, mb and c are not constants along the last axis" in why, why
    _, report = lower_to_kernels(graph, threads=1)
    assert _left_on_reference(report) == {"int.add", "int.lookup"}, str(report)


def test_shiftmax_with_a_per_row_size_term():
    """Alone (no matmul before it), and with sizes varying along the rows as well."""
    g = _gen(12)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (2, 3, 5, 33)))
    sizes = graph.add_input("sizes", TensorType(I32, (2, 1, 5, 33)))
    table = graph.add_constant(torch.tensor([0, 0, 128, 203, 256], dtype=I32))
    graph.set_outputs([graph.call("int.shiftmax", graph.op.add(x, graph.call("int.lookup", sizes, table)), X=96, n=12,
                                  bits=8)])
    _check(graph, [_rand((2, 3, 5, 33), I32, g, -3000, 3000), _rand((2, 1, 5, 33), I32, g, -1, 7)],
           {"cpu.int_shiftmax": 1})


# ---- the float edges -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,zp,lo,hi", [("u8", 128, -128, 127), ("i8", 0, -127, 127), ("i32", 0, -32768, 32767)])
def test_quantize_and_dequantize_become_kernels(dtype, zp, lo, hi):
    g = _gen(13)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(torch.float32, (3, 7, 37)))
    q = graph.call("int.quantize", x, inv_scale=1 / 0.037, zero_point=zp, lo=lo, hi=hi, dtype=dtype)
    scale = graph.add_constant(torch.rand(37, generator=g) * 0.1)
    offset = graph.add_constant(torch.randn(1, 37, generator=g))
    graph.set_outputs([q, graph.call("int.dequantize", q, scale, offset, zero_point=zp),
                       graph.call("int.dequantize", q, graph.add_constant(torch.tensor(0.037)), zero_point=zp)])
    values = torch.randn(3, 7, 37, generator=g) * 3
    values[0, 0, :8] = torch.tensor([0.0185, -0.0185, 0.0555, -4.7, 1e6, -1e6, 0.0, -0.0])  # halves, clamping
    values[1, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    _check(graph, [values * (2000 if dtype == "i32" else 1)], {"cpu.int_quantize": 1, "cpu.int_dequantize": 2})


@pytest.mark.parametrize("C,H,W,ph,pw,dtype,dims", [
    (3, 32, 48, 16, 16, "u8", (0, 2, 4, 1, 3, 5)),      # a ViT's 16 x 16 patches: one vector a run
    (3, 12, 8, 4, 2, "i8", (0, 2, 4, 1, 3, 5)),         # runs shorter than a vector, ph != pw
    (1, 6, 40, 3, 20, "i32", (0, 2, 4, 1, 3, 5)),       # a run of 20 int32: a vector and a partial one
    (3, 8, 8, 4, 4, "u8", (0, 2, 4, 1, 5, 3))])         # another permute: left to the layout ops
def test_quantize_writes_a_vits_patches(C, H, W, ph, pw, dtype, dims):
    """int.quantize -> reshape [B, C, H/ph, ph, W/pw, pw] -> permute (0, 2, 4, 1, 3, 5) -> reshape [B, patches, C ph pw]:
    the quantizer writes the patches itself (no permute left), against the reference of the whole chain."""
    g = _gen(14)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(torch.float32, (2, C, H, W)))
    q = graph.call("int.quantize", x, inv_scale=1 / 0.021, zero_point=128 if dtype == "u8" else 0,
                   lo=-128 if dtype != "i32" else -30000, hi=127 if dtype != "i32" else 30000, dtype=dtype)
    p = graph.call("permute", graph.call("reshape", q, shape=(2, C, H // ph, ph, W // pw, pw)), dims=dims)
    graph.set_outputs([graph.call("reshape", p, shape=(2, H // ph * (W // pw), C * ph * pw))])
    values = torch.randn(2, C, H, W, generator=g) * (3 if dtype != "i32" else 300)
    folded = dims == (0, 2, 4, 1, 3, 5)
    _check(graph, [values], {"cpu.int_quantize": 1, "permute": 0 if folded else 1})
    if folded:          # images of another size are refused, not cut into patches the graph did not have
        from graphopt.backends.cpu_integer import lower_to_kernels
        from graphopt.backends.torch_backend import run
        other = torch.randn(2, C, H + ph, W)
        with pytest.raises(Exception, match=rf"lowered for images \[B, {C}, {H}, {W}\]"):
            run(lower_to_kernels(graph)[0], other)


# ---- whole models ---------------------------------------------------------------------------------
def _left_on_reference(report) -> set[str]:
    """The ops of the report's reference entries ("%12 (int.quantize): why")."""
    return {e.nodes.split("(", 1)[1].split(")", 1)[0] for e in report if e.kernel == "reference"}


def test_tiny_vit_identical_to_reference_and_onnxruntime(tiny_vit_case, isa):
    case = tiny_vit_case
    g = _gen(5)
    calib = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(3)]
    om = graphopt.optimize(case.model, [("integer_only", {"smoothquant": 0.7})], calib[0], calibration=calib,
                           backend="cpu_integer", backend_options={"threads": 2})
    assert _left_on_reference(om.executable.report) == set()
    x = torch.randn(5, 3, 32, 32, generator=g)
    from graphopt.backends.registry import lower
    got = om.executable.run_flat(x)[0]
    assert torch.equal(got, lower(om.graph, "torch").run_flat(x)[0])
    pytest.importorskip("onnxruntime")
    assert torch.equal(got, lower(om.graph, "onnxruntime", threads=1).run_flat(x)[0])


def test_digits_vit_identical_to_reference(digits_case):
    case = digits_case
    calib = [(case.train_images[i:i + 64],) for i in range(0, 256, 64)]
    graph = graphopt.optimize(case.model, ["integer_only"], (case.test_images[:8],), calibration=calib).graph
    from graphopt.backends.registry import lower
    images = case.test_images[:128]
    assert torch.equal(lower(graph, "cpu_integer", threads=2).run_flat(images)[0],
                       lower(graph, "torch").run_flat(images)[0])


@pytest.fixture(scope="module")
def deit_shaped_vit():
    """A DeiT-S-shaped HF ViT (384 wide, 6 heads of 64, MLP 1536), 2 blocks on 36x36 images: 81 patches + CLS;
    its integer_only graph."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1536,
                                 image_size=36, patch_size=4, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    g = _gen(9)
    calib = [(torch.randn(4, 3, 36, 36, generator=g),) for _ in range(2)]
    return graphopt.optimize(model, [("integer_only", {"smoothquant": 0.7})], calib[0], calibration=calib).graph


def _kernels(report) -> set[str]:
    return {e.kernel for e in report if e.kernel != "reference"}


@pytest.mark.parametrize("r", [7, 100])      # 100: more than half the tokens, clamped in every block
def test_deit_shaped_vit_with_token_merge_identical_to_reference(deit_shaped_vit, r):
    from graphopt.backends.registry import lower
    from graphopt.passes import PassManager
    graph, _ = PassManager([f"token_merge:r={r}"]).run(deit_shaped_vit)
    assert graph.op_counts()["int.lookup"] == 1                    # proportional attention in block 2
    ex = lower(graph, "cpu_integer", threads=2)
    assert _left_on_reference(ex.report) == set(), str(ex.report)
    assert {"cpu.int_token_merge", "cpu.int_quantize", "cpu.int_dequantize"} <= _kernels(ex.report)
    assert "cpu.int_shiftmax" not in _kernels(ex.report)           # every Shiftmax stays inside its attention kernel
    from graphopt.backends.cpu_integer import lower_to_kernels
    lowered, _ = lower_to_kernels(graph, threads=2)
    merges = [n for n in lowered.nodes if n.op == "cpu.int_token_merge"]
    assert merges and all(n.attrs["heads_axis"] for n in merges)   # each sums its keys' heads in the kernel
    assert "sum" not in lowered.op_counts()
    reference = lower(graph, "torch")
    g = _gen(10)
    for batch in (1, 3, 1):                                        # batch 1 and > 1, repeated calls
        x = torch.randn(batch, 3, 36, 36, generator=g)
        assert torch.equal(ex.run_flat(x)[0], reference.run_flat(x)[0])


@pytest.mark.parametrize("integer_first", [True, False])
def test_digits_vit_with_token_merge_identical_to_reference(digits_case, integer_first):
    """Either order fuses everything, and every Shiftmax stays inside its attention kernel: integer_only first
    adds the size term to the requantized logits, token_merge first to the matmul's int32 accumulator (int.add)."""
    from graphopt.backends.registry import lower
    from graphopt.passes import PassManager
    case = digits_case
    calib = [(case.train_images[i:i + 32],) for i in range(0, 64, 32)]
    example = (case.test_images[:8],)
    if integer_first:
        base = graphopt.optimize(case.model, ["integer_only"], example, calibration=calib).graph
        graph, _ = PassManager(["token_merge:r=8"]).run(base)
    else:
        graph = graphopt.optimize(case.model, ["token_merge:r=8", "integer_only"], example, calibration=calib).graph
    ex = lower(graph, "cpu_integer", threads=2)
    assert _left_on_reference(ex.report) == set(), str(ex.report)
    assert "cpu.int_token_merge" in _kernels(ex.report)
    assert "cpu.int_shiftmax" not in _kernels(ex.report), str(ex.report)
    reference = lower(graph, "torch")
    for images in (case.test_images[:64], case.test_images[64:65], case.test_images[:64]):
        assert torch.equal(ex.run_flat(images)[0], reference.run_flat(images)[0])


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    try:
        with pytest.raises(kernels.KernelBuildError, match="C compiler"):
            kernels.library()
    finally:
        monkeypatch.undo()
        kernels.library.cache_clear()


def test_bert_with_padding_mask_identical_to_reference():
    """Masked Shiftmax inside the fused attention kernel; integer embeddings and post-norm residuals."""
    model = tiny_bert(64, layers=2)
    g = _gen(6)

    def batch(n):
        ids, mask = padded_ids(g, n, 12)
        return (), {"input_ids": ids, "attention_mask": mask}

    calib = [batch(4) for _ in range(3)]
    om = graphopt.optimize(model, [("integer_only", {"smoothquant": 0.7})], calib[0], calibration=calib,
                           backend="cpu_integer", backend_options={"threads": 2})
    assert any(op == "cpu.int_bmm" for op, _ in om.executable.report)
    assert _left_on_reference(om.executable.report) == set()
    _, kw = batch(5)
    from graphopt.backends.registry import lower
    assert torch.equal(om(**kw).last_hidden_state, lower(om.graph, "torch")(**kw).last_hidden_state)


def test_conv_with_a_runtime_bias_stays_on_the_reference_op():
    from graphopt.backends.cpu_integer import lower_to_kernels
    from graphopt.backends.torch_backend import run
    g = _gen(8)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(U8, (2, 3, 8, 8)))
    b = graph.add_input("b", TensorType(I32, (4,)))
    graph.set_outputs([graph.call("int.conv2d", x, graph.add_constant(_rand((4, 3, 4, 4), I8, g)), b, stride=(4, 4),
                                  x_zp=128)])
    lowered, report = lower_to_kernels(graph)
    assert lowered.op_counts().get("int.conv2d") == 1
    assert any(kind == "reference" and "bias is not a constant" in why for kind, why in report), report
    inputs = [_rand((2, 3, 8, 8), U8, g), _rand((4,), I32, g, -999, 999)]
    assert torch.equal(run(lowered, *inputs)[0], run(graph, *inputs)[0])


def test_a_call_leaves_torch_thread_count_as_it_was(deit_shaped_vit):
    """The executable runs torch's glue ops on one thread (so torch's workers leave the cores to the kernels'
    pool) and restores the caller's setting, also when the call fails."""
    from graphopt.backends.registry import lower
    ex = lower(deit_shaped_vit, "cpu_integer", threads=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x = torch.randn(2, 3, 36, 36, generator=_gen(11))
        assert torch.equal(ex.run_flat(x)[0], lower(deit_shaped_vit, "torch").run_flat(x)[0])
        assert torch.get_num_threads() == 2
        with pytest.raises(Exception):
            ex.run_flat(torch.randn(2, 3, 37, 36))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_kernel_source_of_another_calling_convention_is_refused(tmp_path, monkeypatch):
    """bench/vnni_peak.py --baseline builds older sources: one whose go_* signatures differ must not be called."""
    old = tmp_path / "old_kernels.c"
    old.write_text("int go_has_vnni(void) { return 0; }\n")       # no go_abi(): before the live-row arguments
    monkeypatch.setattr(kernels, "SOURCE", old)
    with pytest.raises(kernels.KernelBuildError, match=f"calling convention 1, these bindings are for {kernels.ABI}"):
        kernels.library.__wrapped__()
