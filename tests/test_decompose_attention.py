"""decompose_attention, before / expected: sdpa becomes matmul / scale / mask / softmax / matmul,
and computes what torch's scaled_dot_product_attention computes."""
import pytest
import torch

from graphopt.ir.interpreter import run
from graphopt.passes import PassError
from tests.textir import assert_graph, run_pass

BEFORE = """
graph main(%q: f32[batch,4,tokens,16], %k: f32[batch,4,tokens,16], %v: f32[batch,4,tokens,8]{mask_input}) {{
  %o: f32[batch,4,tokens,8] = sdpa(%q, %k, %v{mask}, is_causal={causal}, scale=None)
  return %o
}}"""

EXPECTED = """
graph main(%q: f32[batch,4,tokens,16], %k: f32[batch,4,tokens,16], %v: f32[batch,4,tokens,8]{mask_input}) {{
  %scale: f32[] = constant(0.25)
  %neg_inf: f32[] = constant(-inf)
  %kt: f32[batch,4,16,tokens] = permute(%k, dims=[0,1,3,2])
  %qk: f32[batch,4,tokens,tokens] = matmul(%q, %kt)
  %scores: f32[batch,4,tokens,tokens] = mul(%qk, %scale){masking}
  %p: f32[batch,4,tokens,tokens] = softmax({softmax_input}, dim=-1)
  %o: f32[batch,4,tokens,8] = matmul(%p, %v)
  return %o
}}"""

MASKING = {  # the lines between the scaling and the softmax
    None: "",
    "bool": """
  %masked: f32[batch,4,tokens,tokens] = where(%m, %scores, %neg_inf)""",
    "float": """
  %masked: f32[batch,4,tokens,tokens] = add(%scores, %m)""",
    "causal": """
  %r: i64[tokens] = arange(start=0, end=tokens, step=1, dtype=i64)
  %rows: i64[tokens,1] = reshape(%r, shape=[tokens,1])
  %c: i64[tokens] = arange(start=0, end=tokens, step=1, dtype=i64)
  %cols: i64[1,tokens] = reshape(%c, shape=[1,tokens])
  %lower: bool[tokens,tokens] = ge(%rows, %cols)
  %masked: f32[batch,4,tokens,tokens] = where(%lower, %scores, %neg_inf)""",
}
MASK_INPUT = {None: "", "bool": ", %m: bool[batch,1,1,tokens]", "float": ", %m: f32[batch,1,tokens,tokens]",
              "causal": ""}


def texts(kind):
    mask_input, mask = MASK_INPUT[kind], ", %m" if MASK_INPUT[kind] else ""
    before = BEFORE.format(mask_input=mask_input, mask=mask, causal=kind == "causal")
    expected = EXPECTED.format(mask_input=mask_input, masking=MASKING[kind],
                               softmax_input="%masked" if MASKING[kind] else "%scores")
    return before, expected


@pytest.mark.parametrize("kind", [None, "bool", "float", "causal"])
def test_sdpa_becomes_explicit_ops_and_matches_torch(kind):
    before, expected = texts(kind)
    after, report = run_pass(before, "decompose_attention")
    assert_graph(after, expected)
    assert report.counters == {"sdpa_decomposed": 1}
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 10, 16), torch.randn(3, 4, 10, 16), torch.randn(3, 4, 10, 8)
    mask = None
    if kind == "bool":
        mask = torch.rand(3, 1, 1, 10) > 0.3
        mask[..., 0] = True
    elif kind == "float":
        mask = torch.randn(3, 1, 10, 10)
    got = run(after, q, k, v, *([mask] if mask is not None else []))[0]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kind == "causal")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_symbolic_head_size_needs_an_explicit_scale():
    text = """
    graph main(%q: f32[batch,4,10,head], %v: f32[batch,4,10,8]) {
      %o: f32[batch,4,10,8] = sdpa(%q, %q, %v, is_causal=False, scale=None)
      return %o
    }"""
    with pytest.raises(PassError, match=r"the head size head is symbolic.*give sdpa an explicit scale"):
        run_pass(text, "decompose_attention")
    after, _ = run_pass(text.replace("scale=None", "scale=0.5"), "decompose_attention")
    assert "constant(0.5)" in str(after)
