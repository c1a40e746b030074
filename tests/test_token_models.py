"""Token passes on encoder families beyond ViT, against references written on the transformers
modules: SigLIP with 16 tokens and head size 16 (and hidden size == tokens), where the token count
must be followed by its axis, never by its value; LayerScale blocks (DINOv2, BEiT, Data2Vec-vision);
Swin's windowed blocks and SegFormer's spatial-reduction blocks, which are recognised and refused
with the reason."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers as hf

import graphopt
from graphopt.backends.torch_backend import run
from graphopt.frontends import from_torch
from graphopt.ir.structure import analyze
from graphopt.passes import PassError, PassManager
from tests.tome_reference import merge_one_image


def apply(graph, spec):
    return PassManager([spec]).run(graph)[0]


@dataclass
class Parts:
    """One pre-norm block written out: x += scale1(o(attn(norm1(x)))); x += scale2(mlp(norm2(x)))."""
    norm1: Callable
    q: Callable
    k: Callable
    v: Callable
    o: Callable
    scale1: Callable
    norm2: Callable
    mlp: Callable
    scale2: Callable
    heads: int


def _identity(x):
    return x


def siglip_parts(model):
    return [Parts(l.layer_norm1, l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.out_proj,
                  _identity, l.layer_norm2, l.mlp, _identity, model.config.num_attention_heads)
            for l in model.encoder.layers]


def dinov2_parts(model):
    return [Parts(l.norm1, l.attention.q_proj, l.attention.k_proj, l.attention.v_proj, l.attention.o_proj,
                  l.layer_scale1, l.norm2, l.mlp, l.layer_scale2, model.config.num_attention_heads)
            for l in model.encoder.layer]


def beit_parts(model):
    return [Parts(l.layernorm_before, l.attention.q_proj, l.attention.k_proj, l.attention.v_proj, l.attention.o_proj,
                  lambda x, l=l: l.lambda_1 * x, l.layernorm_after, l.mlp, lambda x, l=l: l.lambda_2 * x,
                  model.config.num_attention_heads) for l in model.layers]


def data2vec_parts(model):
    return [Parts(l.layernorm_before, l.attention.attention.query, l.attention.attention.key,
                  l.attention.attention.value, l.attention.output.dense, lambda x, l=l: l.lambda_1 * x,
                  l.layernorm_after, lambda x, l=l: l.output.dense(l.intermediate(x)), lambda x, l=l: l.lambda_2 * x,
                  model.config.num_attention_heads) for l in model.encoder.layer]


def eager_blocks(h, parts, rs=None, protected=0, drop=None, bias=None):
    """The blocks run module by module; ``rs``: ToMe r after each attention residual (proportional
    attention on); ``drop=(layer, keep, rank)``: after that block keep the ``keep`` best patch tokens
    by the CLS row ("cls") or the attention each token receives ("mean") of its attention;
    ``bias(layer)``: an attention bias [1, heads, N, N] over the original tokens (looked up at the
    original positions of the tokens that are left)."""
    s = torch.ones(h.shape[0], h.shape[1], 1)
    positions = torch.arange(h.shape[1]).expand(h.shape[0], -1)
    for i, p in enumerate(parts):
        y = p.norm1(h)
        b, n, c = y.shape
        q, k, v = (f(y).view(b, n, p.heads, -1).transpose(1, 2) for f in (p.q, p.k, p.v))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if bias is not None:
            full = bias(i)[0]
            logits = logits + torch.stack([full[:, at][:, :, at] for at in positions])
        probs = (logits + s.log().view(b, 1, 1, n) if rs else logits).softmax(-1)
        h = h + p.scale1(p.o((probs @ v).transpose(1, 2).reshape(b, n, c)))
        if rs and rs[i]:
            merged = [merge_one_image(h[j], k.mean(1)[j], s[j], rs[i], protected) for j in range(b)]
            h, s = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        h = h + p.scale2(p.mlp(p.norm2(h)))
        if drop and drop[0] == i:
            scores = probs.mean(1)[:, 0] if drop[2] == "cls" else probs.mean((1, 2))
            best = torch.topk(scores[:, protected:], drop[1], dim=1).indices + protected
            keep = torch.cat([torch.arange(protected).expand(b, -1), torch.sort(best, dim=1).values], dim=1)
            h = torch.gather(h, 1, keep[..., None].expand(-1, -1, c))
            positions = torch.gather(positions, 1, keep)
    return h


# ---- SigLIP: the token count equals the head size (and the hidden size) ------------------------------
def siglip(hidden, heads, seed=0):
    torch.manual_seed(seed)
    cfg = hf.SiglipVisionConfig(hidden_size=hidden, num_hidden_layers=3, num_attention_heads=heads,
                                intermediate_size=2 * hidden, image_size=16, patch_size=4)  # 16 tokens
    model = hf.SiglipVisionModel(cfg).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, from_torch(model, (x,))


def siglip_reference(model, x, **kw):
    with torch.no_grad():
        h = model.post_layernorm(eager_blocks(model.embeddings(x), siglip_parts(model), **kw))
        return h, model.head(h)


@pytest.fixture(scope="module", params=[(64, 4), (16, 2)], ids=["head_size=tokens=16", "hidden=tokens=16"])
def siglip_case(request):
    return siglip(*request.param)


def test_siglip_token_count_is_followed_by_axis_not_value(siglip_case):
    model, x, graph = siglip_case
    assert [n.inputs[0].type.shape[-2] for n in graph.find_nodes("sdpa")] == [16, 16, 16]
    after = apply(graph, "token_merge:r=3")
    # only the token axis of every reshape changed: the head size (or hidden size) 16 stays
    assert [n.inputs[0].type.shape[-2] for n in after.find_nodes("sdpa")] == [16, 13, 10]
    assert all(n.inputs[0].type.shape[-1] == model.config.hidden_size // model.config.num_attention_heads
               for n in after.find_nodes("sdpa"))
    hidden, pooled = siglip_reference(model, x, rs=[3, 3, 3])
    out = run(after, x)
    assert out[0].shape == (2, 7, model.config.hidden_size)
    torch.testing.assert_close(out[0], hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], pooled, rtol=1e-4, atol=1e-5)
    assert (hidden[:, 0] - model(x).last_hidden_state[:, 0]).abs().max() > 1e-3  # merging changed the result


def test_siglip_integer_graph_merges_its_blocks_and_not_its_pooling_head(siglip_case):
    # integer_only first, then token_merge: the MAP head's attention (one probe query) once counted as a block, and
    # the pass refused the order that the README allows; an encoder without a CLS token also protects nothing
    model, x, _ = siglip_case
    calib = [(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(10 + i)),) for i in range(4)]
    om = graphopt.optimize(model, ["integer_only", "token_merge:r=3"], (x,), calibration=calib, progress=False)
    counts = om.graph.op_counts()
    assert counts["int.token_merge"] == 3 and counts["int.lookup"] == 2    # proportional attention in blocks 1, 2
    hidden, pooled = siglip_reference(model, x, rs=[3, 3, 3])              # float ToMe, written on the modules
    out = om(x)
    assert out.last_hidden_state.shape == (2, 7, model.config.hidden_size)
    cos = torch.nn.functional.cosine_similarity
    assert cos(out.last_hidden_state, hidden, dim=-1).min() > 0.995 and cos(out.pooler_output, pooled, dim=-1).min() > 0.98


def test_siglip_token_drop_ranks_by_received_attention(siglip_case):
    """SigLIP has no CLS token: tokens are ranked by the attention they receive (rank=mean)."""
    model, x, graph = siglip_case
    after = apply(graph, "token_drop:count=5,layer=0")
    assert [n.inputs[0].type.shape[-2] for n in after.find_nodes("sdpa")] == [16, 5, 5]
    hidden, pooled = siglip_reference(model, x, drop=(0, 5, "mean"))
    out = run(after, x)
    torch.testing.assert_close(out[0], hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], pooled, rtol=1e-4, atol=1e-5)
    with pytest.raises(PassError, match="rank=cls needs a leading CLS token"):
        apply(graph, "token_drop:count=5,rank=cls")


# ---- LayerScale: DINOv2, BEiT, Data2Vec-vision -------------------------------------------------------
LAYER_SCALE = {  # config class, model class, the blocks written out, the model's own head on the last hidden state
    "dinov2": (hf.Dinov2Config, hf.Dinov2Model, dinov2_parts, dict(layerscale_value=0.5),
               lambda m, h: (m.layernorm(h), m.layernorm(h)[:, 0])),
    "beit": (hf.BeitConfig, hf.BeitModel, beit_parts, dict(layer_scale_init_value=0.5),
             lambda m, h: (m.layernorm(h), m.pooler(m.layernorm(h)))),
    "data2vec_vision": (hf.Data2VecVisionConfig, hf.Data2VecVisionModel, data2vec_parts,
                        dict(layer_scale_init_value=0.5), lambda m, h: (m.layernorm(h),)),
}


@pytest.fixture(scope="module", params=sorted(LAYER_SCALE))
def layer_scale_case(request):
    config, cls, parts, extra, head = LAYER_SCALE[request.param]
    torch.manual_seed(0)
    cfg = config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=4, **extra)  # 64 patches + CLS
    model = cls(cfg).eval()
    with torch.no_grad():  # random LayerScale values, so a wrong channel order cannot pass
        for name, p in model.named_parameters():
            if "lambda" in name:
                p.copy_(torch.rand_like(p) + 0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def reference(**kw):
        with torch.no_grad():
            embedded = model.embeddings(x)
            embedded = embedded[0] if isinstance(embedded, tuple) else embedded  # data2vec: (tokens, grid)
            return head(model, eager_blocks(embedded, parts(model), protected=1, **kw))
    return model, x, from_torch(model, (x,)), reference


def test_layer_scale_blocks_recognised(layer_scale_case):
    model, x, graph, _ = layer_scale_case
    structure = analyze(graph)
    assert not structure.problems, structure.problems
    (stack,) = structure.stacks
    assert len(stack) == model.config.num_hidden_layers and structure.special_tokens[0] == [0]
    for block in stack:
        assert len(block.layer_scales) == 2 and block.norm_position == "pre"
        assert block.attention.num_heads == model.config.num_attention_heads


def test_layer_scale_token_merge_matches_eager_tome(layer_scale_case):
    model, x, graph, reference = layer_scale_case
    original = [o for o in model(x).values()]
    for specs, rs in ((["token_merge:r=0"], None), (["token_merge:r=10"], [10, 10, 10]),
                      (["decompose_attention", "token_merge:r=10"], [10, 10, 10])):
        out = run(PassManager(specs).run(graph)[0], x)
        expected = reference(rs=rs) if rs else original
        assert len(out) == len(expected)
        for got, want in zip(out, expected):  # r=0: exactly the original model
            torch.testing.assert_close(got, want, rtol=1e-4 if rs else 0, atol=1e-5 if rs else 0)
    assert out[0].shape[1] == 65 - 30
    assert (expected[0][:, 0] - original[0][:, 0]).abs().max() > 1e-3  # merging changed the result


def test_layer_scale_token_drop_matches_cls_reference(layer_scale_case):
    model, x, graph, reference = layer_scale_case
    for spec, drop in (("token_drop:keep=1.0", None), ("token_drop:count=12,layer=1", (1, 12, "cls"))):
        out = run(apply(graph, spec), x)
        expected = reference(drop=drop) if drop else list(model(x).values())
        for got, want in zip(out, expected):  # keep everything: exactly the original model
            torch.testing.assert_close(got, want, rtol=1e-4 if drop else 0, atol=1e-5 if drop else 0)
    assert out[0].shape[1] == 13


# ---- blocks that need the token grid: Swin, SegFormer -------------------------------------------------
def swin():
    torch.manual_seed(0)
    cfg = hf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    return cfg, hf.SwinModel(cfg).eval()


def segformer():
    torch.manual_seed(0)
    cfg = hf.SegformerConfig(num_encoder_blocks=2, depths=[1, 2], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                             num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])
    return cfg, hf.SegformerModel(cfg).eval()


@pytest.mark.parametrize("build,hidden_of,grid", [
    (swin, lambda cfg: [cfg.embed_dim * 2 ** i for i in range(len(cfg.depths))],
     [r"windowed attention \(Swin\): the 64 tokens of the stream are re-laid into 4 windows of 16 tokens"
      r"( with a relative position bias)?$",
      r"windowed attention \(Swin\): the 64 tokens of the stream are re-laid into 4 windows of 16 tokens, shifted by "
      r"a roll with a relative position bias$"]),
    (segformer, lambda cfg: cfg.hidden_sizes,
     [r"spatial-reduction attention \(SegFormer\): keys and values come from a conv2d with stride \[2, 2\] over the "
      r"token grid .*'stages.0.blocks.0.attention.sequence_reduction.sequence_reduction'",
      r"a conv2d over the token grid inside the MLP \(Mix-FFN, groups 32: .*'stages.0.blocks.0.mlp.dwconv.dwconv'"]),
], ids=["swin", "segformer"])
def test_grid_bound_blocks_recognised_and_token_passes_refuse(build, hidden_of, grid):
    import re
    cfg, model = build()
    graph = from_torch(model, (torch.randn(2, 3, 32, 32),))
    structure = analyze(graph)
    assert not structure.problems, structure.problems
    heads = getattr(cfg, "num_heads", None) or cfg.num_attention_heads
    assert [len(stack) for stack in structure.stacks] == list(cfg.depths)  # one stack per stage
    for stack, hidden, h in zip(structure.stacks, hidden_of(cfg), heads):
        for block in stack:
            assert (block.hidden_size, block.attention.num_heads) == (hidden, h)
            assert block.norm_position == "pre" and block.token_axis == 1 and block.grid
    first = structure.stacks[0]
    reasons = [reason for block in first for reason in block.grid]
    for pattern in grid:
        assert any(re.search(pattern, reason) for reason in reasons), (pattern, reasons)
    for spec, action in (("token_merge:r=2", "merged"), ("token_drop:keep=0.5", "dropped")):
        with pytest.raises(PassError, match=rf"{spec.split(':')[0]}: block 0 \(.*\) needs its tokens on the fixed "
                                            rf"image grid: .*Once tokens are {action}.*does not apply to this model"):
            apply(graph, spec)


def test_relative_position_bias_drop_gathers_the_bias_and_merge_refuses():
    """BEiT as released: a relative position bias per block. Dropping tokens looks the bias up at
    the kept positions; a merged token has no single position, so token_merge refuses."""
    torch.manual_seed(0)
    cfg = hf.BeitConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=4, layer_scale_init_value=0.5, use_relative_position_bias=True)
    model = hf.BeitModel(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.relative_position_bias.relative_position_bias_table.normal_()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    graph = from_torch(model, (x,))
    assert len(analyze(graph).stacks[0]) == 3
    after = apply(graph, "token_drop:count=12,layer=1")
    with torch.no_grad():
        h = eager_blocks(model.embeddings(x), beit_parts(model), protected=1, drop=(1, 12, "cls"),
                         bias=lambda i: model.layers[i].relative_position_bias((8, 8), False, dim_size=65))
        expected = (model.layernorm(h), model.pooler(model.layernorm(h)))
    for got, want in zip(run(after, x), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(PassError, match=r"token_merge: block 0 .* adds a position-dependent bias \(a relative "
                                        r"position bias, as in BEiT\); a merged token has no single position"):
        apply(graph, "token_merge:r=4")
