"""token_merge (ToMe): the matching against a hand-worked example, the schedule in the graph's
types and the cost model, numerics against the original model, ONNX Runtime against torch."""
import copy

import pytest
import torch
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

import graphopt
from graphopt.backends.torch_backend import run
from graphopt.frontends import from_torch
from graphopt.ir import Graph, TensorType
from graphopt.ir.cost import graph_cost
from graphopt.ir.ops.tokens import bipartite_plan, token_merge
from graphopt.passes import PassError, PassManager
from graphopt.passes.token_merge import schedule_r
from tests.tome_reference import merge_one_image

F32 = torch.float32


def tiny_vit(layers=4, image=32, patch=4, seed=0):
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                    image_size=image, patch_size=patch, num_labels=10)
    return ViTForImageClassification(cfg).eval()


@pytest.fixture(scope="module")
def vit():
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, x, from_torch(model, (x,))


def apply(graph, *passes):
    out, report = PassManager(list(passes)).run(graph)
    return out, report


def attention_lengths(graph):
    return [n.inputs[0].type.shape[-2] if n.op == "sdpa" else n.output.type.shape[-1]
            for n in graph.nodes if n.op == "sdpa" or (n.op == "softmax" and n.output.type.rank == 4)]


# ---- the op, by hand ------------------------------------------------------------------------
def test_bipartite_matching_hand_worked_example():
    # 5 tokens, token 0 is CLS (protected). A = {1, 3}, B = {2, 4}.
    # cos(1,2)=0, cos(1,4)=0.8  -> 1 picks 4 with 0.8;  cos(3,2)=0.6, cos(3,4)=0 -> 3 picks 2 with 0.6.
    # r=1: the best edge (1 -> 4) merges; tokens left in order: 0, 2, 3, 4.
    keys = torch.tensor([[[1.0, 0.0, 0.0],      # 0 CLS (would match everything: must be ignored)
                          [0.8, 0.6, 0.0],      # 1 (A)
                          [0.0, 0.0, 1.0],      # 2 (B)
                          [0.0, 0.8, 0.6],      # 3 (A): cos with 2 = 0.6, with 4 = 0
                          [1.0, 0.0, 0.0]]])    # 4 (B): cos with 1 = 0.8
    x = torch.tensor([[[10.0], [1.0], [2.0], [3.0], [4.0]]])
    sizes = torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0]]])  # token 1 already holds 3 tokens
    kept, src_pos, dst_pos = bipartite_plan(keys, 1, 1)
    assert kept.tolist() == [[0, 2, 3, 4]]
    assert src_pos.tolist() == [[1]] and dst_pos.tolist() == [[4]]  # token 1 merges into token 4
    merged, new_sizes = token_merge(x, keys, sizes, r=1, protected=1)
    assert new_sizes.flatten().tolist() == [1.0, 1.0, 1.0, 4.0]
    # size-weighted mean of token 1 (value 1, size 3) and token 4 (value 4, size 1): (3 + 4) / 4
    assert merged.flatten().tolist() == pytest.approx([10.0, 2.0, 3.0, 1.75])
    # r=2: both edges merge (1 -> 4, 3 -> 2); r is clamped to (5 - 1) // 2 = 2 beyond that
    merged2, sizes2 = token_merge(x, keys, sizes, r=5, protected=1)
    assert sizes2.flatten().tolist() == [1.0, 2.0, 4.0]
    assert merged2.flatten().tolist() == pytest.approx([10.0, 2.5, 1.75])


def test_schedules():
    assert schedule_r(4, 8, "constant", None) == [8, 8, 8, 8]
    assert schedule_r(5, 4, "linear", None) == [8, 6, 4, 2, 0]
    assert schedule_r(3, 8, "constant", [1, 0, 2]) == [1, 0, 2]
    with pytest.raises(Exception, match="r_list has 2 entries but the stack has 3 blocks"):
        schedule_r(3, 8, "constant", [1, 2])


# ---- the pass on a captured HF ViT ----------------------------------------------------------
def test_r0_leaves_graph_unchanged(vit):
    model, x, graph = vit
    after, report = apply(graph, "token_merge:r=0")
    assert after.op_counts() == graph.op_counts()
    torch.testing.assert_close(run(after, x)[0], model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("passes,expect", [
    (["token_merge:r=8"], [65, 57, 49, 41]),
    (["token_merge:r=4,schedule=linear"], [65, 57, 52, 49]),  # r per block 8, 5, 3, 0
    (["token_merge:r_list=0,10,0,5"], [65, 65, 55, 55]),
    (["decompose_attention", "token_merge:r=8"], [65, 57, 49, 41]),
])
def test_token_counts_follow_schedule(vit, passes, expect):
    model, x, graph = vit
    after, report = apply(graph, *passes)
    assert attention_lengths(after) == expect
    out = run(after, x)[0]
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    # the cost model knows the saving before anything runs: every GEMM row count shrinks
    before, now = graph_cost(graph).at(batch=8)["flops"], graph_cost(after).at(batch=8)["flops"]
    assert now < before


def test_cls_stays_at_index_0_and_merging_is_mild(vit):
    model, x, graph = vit
    after, _ = apply(graph, "token_merge:r=2")
    merges = after.find_nodes("token_merge")
    assert len(merges) == 4 and all(n.attrs["protected"] == 1 for n in merges)
    # follow CLS: run the reference op chain by hand on the first block output and check row 0 is untouched
    cls_probe = Graph()
    xi = cls_probe.add_input("x", TensorType(F32, ("batch", 9, 4)))
    k = cls_probe.add_input("k", TensorType(F32, ("batch", 9, 3)))
    s = cls_probe.op.full(shape=(xi.type.shape[0], 9, 1), value=1.0, dtype=F32)
    merged, sizes = cls_probe.op.token_merge(xi, k, s, r=4, protected=1)
    assert merged.type.shape[1] == 5
    cls_probe.set_outputs([merged, sizes])
    xv = torch.randn(2, 9, 4)
    kv = torch.randn(2, 9, 3)
    kv[:, 0] = kv[:, 2]  # CLS identical to a B token: still must not merge
    m, sz = run(cls_probe, xv, kv)
    torch.testing.assert_close(m[:, 0], xv[:, 0])
    assert (sz[:, 0] == 1).all() and sz.sum().item() == 2 * 9
    # with a little merging the class scores barely move (proportional attention keeps the weights)
    ref = model(x).logits
    assert (run(after, x)[0] - ref).abs().max() < 0.1 * ref.abs().max()


def test_distillation_token_protected():
    torch.manual_seed(0)
    cfg = DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     image_size=32, patch_size=8, num_labels=5)
    model = DeiTForImageClassificationWithTeacher(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = from_torch(model, (x,))
    after, report = apply(graph, "token_merge:r=8")  # the most the first block can merge; r=9 is refused
    assert all(n.attrs["protected"] == 2 for n in after.find_nodes("token_merge"))
    # 18 tokens: 2 protected, 16 patches -> 8 merge in block 0, 4 (clamped) in block 1
    assert attention_lengths(after) == [18, 10]
    out = run(after, x)
    assert all(torch.isfinite(o).all() for o in out)


def test_symbolic_token_count_gives_symbolic_schedule():
    class Block(torch.nn.Module):
        def __init__(self, d=32, heads=4):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

        def forward(self, x):
            b, n, d = x.shape
            h = self.ln1(x)
            q, k, v = (p(h).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = torch.nn.Parameter(torch.randn(1, 1, 32))
            self.layers = torch.nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            for layer in self.layers:
                h = layer(h)
            return h[:, 0]

    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 20, 32)
    tokens = torch.export.Dim("tokens", min=8, max=512)
    graph = from_torch(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch"), 1: tokens}})
    after, _ = apply(graph, "token_merge:r=3")
    n = [d for d in after.inputs[0].type.shape if not isinstance(d, int)][1]
    lengths = attention_lengths(after)
    assert [str(l - n) for l in lengths] == ["1", "-2", "-5"]  # tokens+1, then minus 3 per block
    flops = graph_cost(after).total.flops
    assert flops.free_symbols >= {n}
    out = run(after, torch.randn(2, 40, 32))[0]
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    pytest.importorskip("onnxruntime")
    ort = graphopt.pipeline.OptimizedModel(after, None, "onnxruntime")
    for n in (20, 41):  # one ONNX model, the token count computed at run time
        xx = torch.randn(3, n, 32)
        torch.testing.assert_close(ort(xx), run(after, xx)[0], rtol=1e-4, atol=1e-5)


def test_keep_order_restores_every_position():
    class Dense(torch.nn.Module):  # per-token output: needs every position
        def __init__(self, vit):
            super().__init__()
            self.vit = vit.vit

        def forward(self, x):
            return self.vit(x).last_hidden_state

    model = Dense(tiny_vit(layers=2))
    x = torch.randn(2, 3, 32, 32)
    graph = from_torch(model, (x,))
    after, _ = apply(graph, "token_merge:r=8,keep_order=true")
    out = run(after, x)[0]
    assert out.shape == (2, 65, 64)
    ref = model(x)
    # unmerged positions track their own token: most rows stay close to the original
    assert (out - ref).norm(dim=-1).median() < 0.5 * ref.norm(dim=-1).median()
    with pytest.raises(PassError, match="r_list has 1 entries but the stack has 2 blocks"):
        apply(graph, "token_merge:r_list=1")


# ---- against an independent ToMe on the eager HF model -------------------------------------------

def _eager_tome_vit(model, x, rs, prop_attn=True, protected=1):
    """An HF ViT run module by module with ToMe after each attention residual (logits)."""
    vit = model.vit
    with torch.no_grad():
        h = vit.embeddings(x)
        s = torch.ones(h.shape[0], h.shape[1], 1)
        for layer, r in zip(vit.layers, rs):
            att = layer.attention
            y = layer.layernorm_before(h)
            B, N, C = y.shape; d = att.head_dim
            q, k, v = (p(y).view(B, N, -1, d).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
            logits = q @ k.transpose(-1, -2) * att.scaling
            if prop_attn:
                logits = logits + s.log().view(B, 1, 1, N)
            h = att.o_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)) + h
            if r:
                km = k.mean(1)
                outs = [merge_one_image(h[b], km[b], s[b], r, protected) for b in range(B)]
                h = torch.stack([o[0] for o in outs]); s = torch.stack([o[1] for o in outs])
            h = layer.mlp(layer.layernorm_after(h)) + h
        return model.classifier(vit.layernorm(h)[:, 0])


def test_token_merge_after_low_rank_equals_eager_tome_on_the_factorised_weights(vit):
    """low_rank writes each linear as linear(linear(x, A), B): the structure analysis still sees those
    projections, and the merged graph computes eager ToMe on the model whose weights are B A."""
    model, x, graph = vit
    factorised, _ = apply(graph, "low_rank:method=svd,ratio=0.3")
    after, _ = apply(factorised, "token_merge:r=8")
    reconstructed = copy.deepcopy(model)
    for node in factorised.nodes:
        if node.meta.get("low_rank_part") == "b":
            a = node.inputs[0].producer.inputs[1].const
            reconstructed.get_submodule(node.meta["low_rank"]["layer"]).weight.data = node.inputs[1].const @ a
    torch.testing.assert_close(run(after, x)[0], _eager_tome_vit(reconstructed, x, [8] * 4), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pass_spec,rs,prop_attn", [("token_merge:r=8", [8] * 4, True),
                                                    ("token_merge:r=6,schedule=linear", [12, 8, 4, 0], True),
                                                    ("token_merge:r=20,prop_attn=false", [20] * 4, False)])
def test_merged_graph_equals_eager_tome(vit, pass_spec, rs, prop_attn):
    model, x, graph = vit
    after, _ = apply(graph, pass_spec)
    expected = _eager_tome_vit(model, x, rs, prop_attn)
    torch.testing.assert_close(run(after, x)[0], expected, rtol=1e-4, atol=1e-5)
    assert (expected - model(x).logits).abs().max() > 1e-3  # the merge changes the logits


def test_onnxruntime_matches_reference(vit):
    pytest.importorskip("onnxruntime")
    model, x, graph = vit
    for passes in (["token_merge:r=8"], ["decompose_attention", "token_merge:r=6,keep_order=true"]):
        after, _ = apply(graph, *passes)
        ort = graphopt.pipeline.OptimizedModel(after, None, "onnxruntime")
        ref = graphopt.pipeline.OptimizedModel(after, None, "torch")
        for batch in (x, x[:1]):
            torch.testing.assert_close(ort(batch).logits, ref(batch).logits, rtol=1e-4, atol=1e-5)


def test_no_transformer_blocks_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    graph = from_torch(model, (torch.randn(2, 8),))
    with pytest.raises(PassError, match="token_merge needs transformer blocks.*no attention found"):
        apply(graph, "token_merge:r=4")
