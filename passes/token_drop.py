"""Attention-guided token dropping (HiRED / FastV style).

    where=layer      vision encoder: after block L keep the top-k patch tokens by the CLS attention
                     of block L (head-averaged); CLS / distillation tokens are always kept. Encoders
                     without a CLS token (SigLIP) rank by the attention each token receives,
                     averaged over all queries and heads (rank=mean)
    where=connector  vision-language model (HiRED): rank the image features by the CLS attention of
                     the vision block that feeds the connector; the language model gets only the
                     kept image tokens (and every text token); its position ids are renumbered 0..T'-1
    where=language   vision-language model (FastV): before language block K keep the image tokens
                     that block K-1's last query position attends to most; position ids stay the
                     original ones (rotary tables and the causal mask are gathered at the kept positions)

    stream -> token_gather(stream, token_topk_index(scores, candidates; k))

Side inputs that still carry the old token count (attention masks, rotary tables) are gathered
at the kept positions where a later node reads them, so masks keep their exact semantics.
"""
from __future__ import annotations

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.ir.traversal import ancestors
from graphopt.ir.types import dims_equal
from graphopt.passes.registry import option, register_pass
from graphopt.passes.token_common import (TokenPassError, aligned_axes, attention_row, refuse_grid_bound,
                                          refused_after, retype, structure_of)


def keep_count(pool: int, keep: float, count: int) -> int:
    if count > 0:
        if count > pool:
            raise TokenPassError(f"token_drop: count={count} is more than the {pool} candidate tokens")
        return count
    if not 0 < keep <= 1:
        raise TokenPassError(f"token_drop: keep must be a fraction in (0, 1], got {keep}")
    return max(1, int(round(pool * keep)))


@register_pass("token_drop", tolerance=None, requires=refused_after(
    ("token_merge", "int.token_merge"),
    "the graph already merges tokens (token_merge ran): token_drop ranks a block's tokens by its attention, which sees "
    "the tokens before that block's merge, and would gather the ranked indices from the merged (shorter) output; use "
    "token_merge or token_drop, not both"))
def token_drop(graph: Graph, ctx, *,
               keep: float = option(0.25, "fraction of the candidate (patch / image) tokens kept"),
               count: int = option(0, "number of candidate tokens kept (overrides keep when > 0)"),
               where: str = option("auto", "layer | connector | language (auto: connector for a model with a "
                                           "vision and a language stack, layer otherwise)"),
               layer: int = option(-1, "layer: the vision block whose CLS attention ranks tokens and after which "
                                       "they are dropped (-1: the middle block); connector: the ranking block "
                                       "(-1: the one feeding the connector); language: K, drop before block K"),
               positions: str = option("auto", "keep | renumber: position ids of the kept language tokens "
                                               "(auto: renumber at the connector, keep for language)"),
               rank: str = option("auto", "where=layer: cls | mean: rank by the CLS token's attention, or by the "
                                          "attention each token receives averaged over all queries and heads "
                                          "(auto: cls when the encoder has a leading CLS token, else mean)")):
    """Keep the top-k tokens by attention (CLS attention in the vision encoder, last-token attention
    in the language model) and drop the rest."""
    s = structure_of(graph, "token_drop")
    refuse_grid_bound(s.blocks, "token_drop", "dropped")
    if where == "auto":
        where = "connector" if len(s.stacks) >= 2 else "layer"
    if where not in ("layer", "connector", "language"):
        raise TokenPassError(f"token_drop: where must be layer, connector or language, got {where!r}")
    if positions == "auto":
        positions = "keep" if where == "language" else "renumber"
    if where == "layer":
        _drop_in_vision(graph, ctx, s, keep, count, layer, rank)
    else:
        if len(s.stacks) < 2 or s.connector_input is None:
            raise TokenPassError(f"token_drop: where={where} needs a vision-language model (a vision stack, a "
                                 f"connector and a language stack); found {len(s.stacks)} stack(s)"
                                 + ("" if len(s.stacks) < 2 else " and no connector"))
        _drop_in_language(graph, ctx, s, keep, count, layer, where, positions)
    graph.remove_dead()


def _drop_in_vision(graph, ctx, s, keep, count, layer, rank):
    blocks = s.stacks[0]
    causal = next((b for b in blocks if b.attention.causal), None)
    if causal is not None:    # a decoder: its tokens are the text it predicts from, and the ranking favours the first
        raise TokenPassError(f"token_drop: where=layer drops patch tokens of a bidirectional vision encoder, and block "
                             f"{causal.index} ({causal.module or causal.attention.core.label()}) has causal attention "
                             "(a decoder); in a vision-language model use where=language (FastV: image tokens only)")
    if len(blocks) < 2:
        raise TokenPassError("token_drop: the vision stack has a single block; nothing runs after a drop")
    index = len(blocks) // 2 - 1 if layer < 0 else layer
    if not 0 <= index < len(blocks) - 1:
        raise TokenPassError(f"token_drop: layer={layer} must name a block before the last (0..{len(blocks) - 2})")
    block = blocks[index]
    special = s.special_tokens.get(0, [])
    p = len(special)
    if special != list(range(p)):
        raise TokenPassError(f"token_drop: the special tokens {special} found by the structure analysis are not the "
                             "leading positions")
    graph.meta["leading_tokens_kept"] = p  # dropping keeps the leading special tokens in place
    if rank == "auto":
        rank = "cls" if p else "mean"
    if rank not in ("cls", "mean"):
        raise TokenPassError(f"token_drop: rank must be cls or mean, got {rank!r}")
    if rank == "cls" and p == 0:
        raise TokenPassError("token_drop: rank=cls needs a leading CLS token, and the structure analysis found "
                             "none; use rank=mean (the attention each token receives)")
    stream = block.output
    n = stream.type.shape[1]
    k = keep_count(int(n) - p, keep, count)
    scores = attention_row(graph, block.attention, 0 if rank == "cls" else "all", block.attention.core)
    with graph.inserting_after(stream.producer):
        idx = graph.op.token_topk_index(scores, k=k, protected=p)
        kept = graph.op.token_gather(stream, idx, axis=1)
    _replace_stream(graph, stream, kept, idx, None)
    ctx.count("tokens_dropped", int(n) - p - k)
    ctx.note(f"after block {index}: kept {p} special + {k} of {int(n) - p} patch tokens, ranked by "
             + ("the CLS token's attention" if rank == "cls" else "the attention each token receives"))


def _drop_in_language(graph, ctx, s, keep, count, layer, where, positions):
    language = s.stacks[-1]
    seq = language[0].input
    scatter = _image_scatter(seq)
    is_img = scatter.inputs[1]
    op = graph.op
    bsz, t = seq.type.shape[0], seq.type.shape[1]
    n_feat = s.connector[0].input.type.shape[1] if s.connector else None
    if n_feat is None or not isinstance(n_feat, int):
        raise TokenPassError("token_drop: the number of image features per image is not static")
    k = keep_count(n_feat, keep, count)
    if where == "connector":
        vision = s.stacks[0]
        feeding = [b for b in vision if b.output is s.connector_input]
        rank_block = feeding[0] if layer < 0 and feeding else vision[layer if layer >= 0 else -1]
        cls = attention_row(graph, rank_block.attention, 0, rank_block.attention.core)   # [B, Nv]
        nv = cls.type.shape[1]
        with graph.inserting_after(seq.producer):
            mask2d = op.reshape(is_img, shape=(bsz, t))
            feat_scores = op.slice(cls, dim=1, start=int(nv) - n_feat)                 # [B, n_feat]
            m = op.cast(mask2d, dtype=torch.float32)
            tri = graph.add_constant(torch.triu(torch.ones(int(t), int(t))), "token_drop_cumsum")
            order = op.sub(op.matmul(m, tri), graph.add_constant(torch.tensor(1.0), "one"))  # feature index per position
            order = op.cast(op.clamp(order, min=0.0), dtype=torch.int64)
            pos_scores = op.token_gather(feat_scores, order, axis=1)                      # [B, T]
            idx = op.token_topk_index(pos_scores, mask2d, k=k, num_candidates=n_feat)
            kept = op.token_gather(seq, idx, axis=1)
        _replace_stream(graph, seq, kept, idx, positions)
        ctx.note(f"connector: kept {k} of {n_feat} image tokens per image (ranked by the CLS attention of vision "
                 f"block {rank_block.index}); language sequence {t} -> {t - n_feat + k}; positions {positions}")
    else:
        if not 1 <= layer < len(language):
            raise TokenPassError(f"token_drop: where=language needs layer=K with 1 <= K < {len(language)} "
                                 "(drop before language block K, ranked by block K-1)")
        prev = language[layer - 1]
        scores = attention_row(graph, prev.attention, "last", prev.attention.core)         # [B, T]
        stream = prev.output
        with graph.inserting_after(stream.producer):
            mask2d = op.reshape(is_img, shape=(bsz, t))
            idx = op.token_topk_index(scores, mask2d, k=k, num_candidates=n_feat)
            kept = op.token_gather(stream, idx, axis=1)
        _replace_stream(graph, stream, kept, idx, positions)
        ctx.note(f"language block {layer}: kept {k} of {n_feat} image tokens per image (ranked by the last "
                 f"token's attention in block {layer - 1}); sequence {t} -> {t - n_feat + k}; positions {positions}")
    ctx.count("tokens_dropped", n_feat - k)


def _image_scatter(seq: Value) -> Node:
    """The masked_scatter (at most six steps above the language model's input) that places the image
    features at the image token positions."""
    for node in ancestors(seq, depth=6):
        if node.op == "opaque" and node.attrs["target"].startswith("aten::masked_scatter"):
            return node
    raise TokenPassError(f"token_drop: no masked_scatter placing the image features into the language model's "
                         f"input %{seq.name} was found, so the image token positions are unknown")


def _replace_stream(graph: Graph, stream: Value, kept: Value, idx: Value, positions: str | None) -> None:
    """Use ``kept`` instead of ``stream`` everywhere after it; gather side inputs at the kept positions."""
    old_n = stream.type.shape[1]
    new_n = kept.type.shape[1]
    for user, i in list(stream.uses):
        if user is not kept.producer:
            graph.set_input(user, i, kept)
    graph.outputs = [kept if v is stream else v for v in graph.outputs]
    cache: dict[tuple, Value] = {}

    def fix(node: Node, moved) -> bool:
        done = False
        for i, v in enumerate(node.inputs):
            if v is None or v is idx or i in moved:
                continue
            if v.producer is not None and v.producer.op in ("token_gather", "token_topk_index"):
                continue
            axes = [a for a in aligned_axes(node, i, moved) if dims_equal(v.type.shape[a], old_n)]
            if not axes:
                continue
            is_mask = node.op == "sdpa" and i == 3 or v.type.dtype == torch.bool
            mode = "slice" if positions == "renumber" and not is_mask else "gather"
            key = (id(v), mode, tuple(axes))
            if key not in cache:
                g = v
                anchor = v.producer.next if v.producer is not None else next(graph.nodes, None)
                anchor = idx.producer.next if _before(graph, anchor, idx.producer) else anchor
                with graph.inserting_before(anchor):
                    for a in axes:
                        g = (graph.op.slice(g, dim=a, start=0, end=new_n) if mode == "slice"
                             else graph.op.token_gather(g, idx, axis=a))
                cache[key] = g
            graph.set_input(node, i, cache[key])
            done = True
        return done

    retype(graph, {id(kept): stream.type}, fix)


def _before(graph: Graph, a: Node | None, b: Node) -> bool:
    """True when node ``a`` comes at or before node ``b`` (so code after b must go later)."""
    if a is None:
        return False
    n = a
    while n is not None:
        if n is b:
            return True
        n = n.next
    return False
