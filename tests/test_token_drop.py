"""token_drop (HiRED / FastV style) against references written directly on the transformers
modules: CLS-attention dropping in a ViT, HiRED-style dropping at a LLaVA connector (positions
renumbered) and FastV-style dropping inside the language model (original position ids)."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, ViTConfig, ViTForImageClassification
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from graphopt import zoo
from graphopt.backends.torch_backend import run
from graphopt.frontends import from_torch
from graphopt.ir import Graph, TensorType
from graphopt.passes import PassError, PassManager

F32 = torch.float32


def apply(graph, *passes):
    return PassManager(list(passes)).run(graph)


def head_mean_row(q, k, heads, row):
    """Softmax attention of query ``row`` over all keys, averaged over heads (q, k: [B, N, C])."""
    b, n, c = q.shape
    d = c // heads
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, n, heads, d).transpose(1, 2)
    return torch.softmax(q[:, :, row:row + 1] @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)[:, 0]


def topk_sorted(scores, k):
    return torch.sort(torch.topk(scores, k, dim=1).indices, dim=1).values


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                    image_size=32, patch_size=4, num_labels=10)
    model = ViTForImageClassification(cfg).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return model, x, from_torch(model, (x,))


def test_vit_cls_attention_drop_matches_hand_reference(vit):
    model, x, graph = vit
    after, report = apply(graph, "token_drop:count=10,layer=1")
    lengths = [n.inputs[0].type.shape[-2] for n in after.nodes if n.op == "sdpa"]
    assert lengths == [65, 65, 11, 11]
    with torch.no_grad():
        h = model.vit.embeddings(x)
        for i, layer in enumerate(model.vit.layers):
            if i == 1:
                ln = layer.layernorm_before(h)
                scores = head_mean_row(layer.attention.q_proj(ln), layer.attention.k_proj(ln), 4, 0)
                keep = topk_sorted(scores[:, 1:], 10) + 1
            h = layer(h)
            if i == 1:
                h = torch.cat([h[:, :1], torch.gather(h, 1, keep[..., None].expand(-1, -1, h.shape[-1]))], dim=1)
        ref = model.classifier(model.vit.layernorm(h)[:, 0])
    torch.testing.assert_close(run(after, x)[0], ref, rtol=1e-4, atol=1e-5)


def test_vit_keep_everything_is_exact(vit):
    model, x, graph = vit
    after, _ = apply(graph, "token_drop:keep=1.0")
    torch.testing.assert_close(run(after, x)[0], model(x).logits, rtol=0, atol=0)


def test_vit_drop_runs_in_onnxruntime(vit):
    pytest.importorskip("onnxruntime")
    import graphopt
    model, x, graph = vit
    after, _ = apply(graph, "decompose_attention", "token_drop:keep=0.25,layer=0")
    ort = graphopt.pipeline.OptimizedModel(after, None, "onnxruntime")
    torch.testing.assert_close(ort(x).logits, run(after, x)[0], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def vlm():
    case = zoo.llava(24, batch=2, image=32, patch=8, vision_hidden=64, text_hidden=64, vision_layers=2, text_layers=3,
                     vocab=1000, vision_feature_layer=-2)   # 16 image tokens at positions 1..16, 24 in all
    model, inputs = case.model, case.kwargs
    graph = from_torch(model, (), inputs, dynamic_batch=False)
    return model, inputs, graph


def _merged_embeds(model, inputs):
    ids, px = inputs["input_ids"], inputs["pixel_values"]
    vt = model.model.vision_tower
    hs = vt(px, output_hidden_states=True).hidden_states
    feats = model.model.multi_modal_projector(hs[-2][:, 1:])
    embeds = model.model.language_model.embed_tokens(ids).clone()
    embeds[ids == model.config.image_token_index] = feats.reshape(-1, feats.shape[-1])
    return embeds, hs


def _kept_positions(ids, image_id, image_scores, k):
    """Every text position plus the image positions of the k best-scoring image tokens, ascending."""
    rows = []
    for b in range(ids.shape[0]):
        img = torch.nonzero(ids[b] == image_id).flatten()
        txt = torch.nonzero(ids[b] != image_id).flatten()
        best = img[torch.topk(image_scores[b], k).indices]
        rows.append(torch.sort(torch.cat([txt, best])).values)
    return torch.stack(rows)


def test_vlm_connector_drop_matches_hiRED_reference(vlm):
    model, inputs, graph = vlm
    after, report = apply(graph, "token_drop:keep=0.25")
    assert "language sequence 24 -> 12" in report.passes[0].notes[0]
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds, hs = _merged_embeds(model, inputs)
        layer0 = model.model.vision_tower.encoder.layers[0]  # feeds the connector (vision_feature_layer=-2)
        ln = layer0.layer_norm1(hs[0])
        cls = head_mean_row(layer0.self_attn.q_proj(ln), layer0.self_attn.k_proj(ln), 4, 0)
        kept = _kept_positions(ids, model.config.image_token_index, cls[:, 1:], 4)
        sel = torch.gather(embeds, 1, kept[..., None].expand(-1, -1, embeds.shape[-1]))
        ref = model.lm_head(model.model.language_model(inputs_embeds=sel).last_hidden_state)  # positions 0..11
    out = run(after, ids, inputs["pixel_values"])[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_vlm_fastv_drop_keeps_position_ids(vlm):
    model, inputs, graph = vlm
    after, report = apply(graph, "token_drop:where=language,layer=1,keep=0.25")
    lm = model.model.language_model
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds, _ = _merged_embeds(model, inputs)
        t = ids.shape[1]
        pos = torch.arange(t)[None].expand(ids.shape[0], -1)
        cos, sin = lm.rotary_emb(embeds, position_ids=pos)
        layer0 = lm.layers[0]
        ln = layer0.input_layernorm(embeds)
        b, n, c = ln.shape
        q = layer0.self_attn.q_proj(ln).view(b, n, 4, -1).transpose(1, 2)
        k = layer0.self_attn.k_proj(ln).view(b, n, 4, -1).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        last = torch.softmax(q[:, :, -1:] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(1)[:, 0]
        image = ids == model.config.image_token_index
        kept = _kept_positions(ids, model.config.image_token_index, last[image].view(b, -1), 4)
        h = layer0(embeds, attention_mask=None, position_embeddings=(cos, sin))
        h = torch.gather(h, 1, kept[..., None].expand(-1, -1, c))
        cos_k, sin_k = lm.rotary_emb(h, position_ids=kept)  # the original positions of the kept tokens
        for layer in lm.layers[1:]:
            h = layer(h, attention_mask=None, position_embeddings=(cos_k, sin_k))
        ref = model.lm_head(lm.norm(h))
    out = run(after, ids, inputs["pixel_values"])[0]
    assert out.shape == (2, 12, model.config.text_config.vocab_size)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_vlm_keep_everything_is_exact(vlm):
    model, inputs, graph = vlm
    ref = run(graph, inputs["input_ids"], inputs["pixel_values"])[0]
    for spec in ("token_drop:keep=1.0", "token_drop:where=language,layer=2,keep=1.0"):
        after, _ = apply(graph, spec)
        torch.testing.assert_close(run(after, inputs["input_ids"], inputs["pixel_values"])[0], ref, rtol=0, atol=0)


def test_topk_index_op_by_hand():
    g = Graph()
    s = g.add_input("s", TensorType(F32, ("batch", 6)))
    c = g.add_input("c", TensorType(torch.bool, ("batch", 6)))
    g.set_outputs([g.op.token_topk_index(s, k=2, protected=1), g.op.token_topk_index(s, c, k=1, num_candidates=3)])
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.7, 0.2]])
    cand = torch.tensor([[False, True, True, False, True, False]])
    a, b = run(g, scores, cand)
    assert a.tolist() == [[0, 2, 4]]          # CLS + the two best patches (0.7 at 4, 0.5 at 2), ascending
    assert b.tolist() == [[0, 3, 4, 5]]       # all non-candidates + the best candidate (4)


def test_errors_name_what_is_missing(vit):
    _, x, graph = vit
    with pytest.raises(PassError, match="where=connector needs a vision-language model"):
        apply(graph, "token_drop:where=connector")
    with pytest.raises(PassError, match="layer=3 must name a block before the last"):
        apply(graph, "token_drop:layer=3")
    mlp = from_torch(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    with pytest.raises(PassError, match="token_drop needs transformer blocks.*no attention found"):
        apply(mlp, "token_drop")


def test_a_text_decoder_is_refused_not_cut_to_its_first_tokens():
    # causal attention gives the first tokens the most attention received: where=layer kept positions 0..2 of 12
    # and dropped the last token, the one a language model predicts from, without a word
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, use_cache=False)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    graph = from_torch(LlamaModel(cfg).eval(), (), {"input_ids": ids})
    with pytest.raises(PassError, match=r"block 0 .*has causal attention \(a decoder\).*use where=language"):
        apply(graph, "token_drop")
