"""ToMe token merging (Bolya et al., 2023), inserted into every transformer block of a stack.

    x = x + attn(norm1(x))                    x = x + attn(norm1(x), bias=log(sizes))
    x = x + mlp(norm2(x))          ->         x, sizes = token_merge(x, mean_heads(k), sizes; r_i)
                                              x = x + mlp(norm2(x))

Bipartite soft matching on the head-averaged keys, size-weighted merging, sizes carried to the
next blocks and proportional attention (``log(size)`` added to the attention logits: an additive
``sdpa`` mask, or an add before the softmax of decomposed attention). Protected leading tokens
(CLS, distillation) never merge and keep their positions. The token count of every later value
is re-derived from the op type rules, so the cost model sees the schedule before anything runs.
On a graph integer_only produced, ``passes/integer_only/tokens.py`` inserts ``int.token_merge`` instead
(integer matching and merging, proportional attention as an integer Shiftmax bias).
"""
from __future__ import annotations

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.ir.ops.tokens import merged_count
from graphopt.ir.structure import Attention, Block
from graphopt.passes.integer_only.tokens import merge_integer_graph
from graphopt.passes.registry import option, register_pass
from graphopt.passes.token_common import (MASK_REFUSALS, TokenPassError, mask_verdict, refuse_grid_bound, refused_after,
                                          retype, structure_of)


def schedule_r(num_blocks: int, r: int, schedule: str, r_list: list[int] | None) -> list[int]:
    """Tokens merged in each block: constant r, linearly decreasing (2r -> 0, about r per block on
    average), or an explicit per-block list."""
    if r_list is not None:
        if len(r_list) != num_blocks:
            raise TokenPassError(f"token_merge: r_list has {len(r_list)} entries but the stack has {num_blocks} blocks")
        if any(v < 0 for v in r_list):
            raise TokenPassError(f"token_merge: r_list entries must be >= 0, got {r_list}")
        return list(r_list)
    if r < 0:
        raise TokenPassError(f"token_merge: r must be >= 0, got {r}")
    if schedule == "constant":
        return [r] * num_blocks
    if schedule == "linear":
        if num_blocks == 1:
            return [r]
        return [int(round(2 * r * (num_blocks - 1 - i) / (num_blocks - 1))) for i in range(num_blocks)]
    raise TokenPassError(f"token_merge: schedule must be 'constant' or 'linear', got {schedule!r}")


@register_pass("token_merge", tolerance=None, requires=refused_after(
    ("token_topk_index",),
    "the graph already drops tokens (token_drop ran): token_drop ranks a block's tokens by its attention and gathers "
    "them from the block's output, and a merge inside the block in between would make its indices point at the wrong "
    "(or missing) tokens; use token_merge or token_drop, not both"))
def token_merge(graph: Graph, ctx, *,
                r: int = option(8, "tokens merged away in each block"),
                schedule: str = option("constant", "constant: r in every block; linear: 2r in the first block "
                                                   "decreasing to 0 in the last"),
                r_list: list[int] | None = option(None, "explicit tokens merged per block (overrides r and schedule)"),
                prop_attn: bool = option(True, "proportional attention: add log(size) to the attention logits"),
                keep_order: bool = option(False, "track the original tokens inside every merged token and restore "
                                                 "all token positions at the end of the stack (dense outputs)"),
                protect: int = option(-1, "leading tokens that never merge; -1: the CLS/distillation tokens found "
                                          "by the structure analysis"),
                stack: int = option(0, "which transformer stack to merge in (0: the first, e.g. a VLM's vision tower)")):
    """ToMe: merge r tokens per block by bipartite soft matching of the attention keys."""
    if graph.find_nodes("int.shiftmax") and not graph.find_nodes("sdpa") and not graph.find_nodes("softmax"):
        return merge_integer_graph(graph, ctx, lambda blocks: schedule_r(blocks, r, schedule, r_list), prop_attn,
                                   protect, keep_order, stack)
    structure = structure_of(graph, "token_merge")
    if not -len(structure.stacks) <= stack < len(structure.stacks):
        raise TokenPassError(f"token_merge: stack {stack} does not exist; the graph has {len(structure.stacks)} "
                             "transformer stack(s)")
    stack = stack % len(structure.stacks)
    blocks = structure.stacks[stack]
    refuse_grid_bound([b for b in structure.blocks if b.index >= blocks[0].index], "token_merge",
                      "merged (ToMe matches tokens by similarity, not by position)")
    rs = schedule_r(len(blocks), r, schedule, r_list)
    if not any(rs):
        ctx.note("r is 0 in every block: graph unchanged")
        return
    special = structure.special_tokens.get(stack, [])
    if protect < 0:
        if special != list(range(len(special))):
            raise TokenPassError(f"token_merge: the special tokens {special} are not the leading positions; give "
                                 "protect=N for the number of leading tokens to keep")
        protect = len(special)
    for b in blocks:
        _check_block(b)
    graph.meta["leading_tokens_kept"] = protect  # outputs that keep the token axis agree on these positions
    first = blocks[0].input.type.shape[1]
    if isinstance(first, int) and max(rs) > (first - protect) // 2:  # later blocks clamp r, as ToMe does
        raise TokenPassError(f"token_merge: r={max(rs)} is too large for {first} tokens ({protect} protected): a block "
                             f"merges at most half of the unprotected tokens, so r is at most {(first - protect) // 2}")
    trivial = set()
    for b in blocks:
        mask = b.attention.mask
        if mask is not None:
            verdict = mask_verdict(mask)
            if verdict != "trivial":
                raise TokenPassError(f"token_merge: block {b.index} ({b.module or b.attention.core.label()}): its attention "
                                     f"mask %{mask.name} {MASK_REFUSALS[verdict]}")
            trivial.add(id(mask))
    cores = {id(b.attention.core) for b in blocks}
    const_true = graph.add_constant(torch.tensor(True), "tome_keep_all")
    const_zero = graph.add_constant(torch.tensor(0.0, dtype=blocks[0].input.type.dtype), "tome_zero")

    def fix(node: Node, moved) -> bool:
        """A merged block's trivial mask no longer fits its token count: it was all-pass, so drop it."""
        done = False
        for i, v in enumerate(node.inputs):
            if v is not None and id(v) in trivial:
                if node.op == "sdpa" and id(node) in cores and i == len(node.inputs) - 1:
                    v.uses.remove((node, i))  # the mask is sdpa's last input; sdpa rejects a 0-d one
                    del node.inputs[i]
                elif node.op == "where" and i == 0:
                    graph.set_input(node, i, const_true)
                elif node.op == "add":
                    graph.set_input(node, i, const_zero)
                else:
                    continue
                done = True
        return done

    sizes: Value | None = None
    source: Value | None = None
    counts = []
    for block, r_i in zip(blocks, rs):
        attn = block.attention
        counts.append(attn.core.inputs[0].type.shape[-2] if attn.kind == "sdpa" else attn.probs.type.shape[-1])
        if sizes is not None and prop_attn:
            _proportional_attention(graph, attn, sizes)
            ctx.count("proportional_attention")
        if r_i == 0:
            continue
        point = _merge_point(block)
        stream = point.output
        op = graph.op
        with graph.inserting_after(point):
            keys = op.mean(_keys(graph, attn), dims=(1,), keepdim=False)  # [B, N, head]
            bsz, n = stream.type.shape[0], stream.type.shape[1]
            if sizes is None:
                sizes = op.full(shape=(bsz, n, 1), value=1.0, dtype=stream.type.dtype)
                if keep_order:
                    eye = graph.add_constant(torch.eye(int(n), dtype=stream.type.dtype).unsqueeze(0), "tome_source")
                    source = op.expand(eye, shape=(bsz, n, n))
            inputs = [stream, keys, sizes] + ([source] if source is not None else [])
            node = graph.create_node("token_merge", inputs, {"r": r_i, "protected": protect},
                                     meta={"module": block.module})
        merged = node.outputs[0]
        sizes = node.outputs[1]
        source = node.outputs[2] if source is not None else None
        changed = {id(merged): stream.type}
        for user, i in list(stream.uses):
            if user is not node:
                graph.set_input(user, i, merged)
        graph.outputs = [merged if v is stream else v for v in graph.outputs]
        retype(graph, changed, fix)
        ctx.count("blocks_merged")
    if keep_order and source is not None:
        _unmerge(graph, blocks[-1], source)
    graph.remove_dead()
    final = merged_count(counts[-1], rs[-1], protect)
    ctx.note(f"stack {stack}: r per block {rs}; tokens entering each block {[str(c) for c in counts]}, "
             f"leaving the last {final}")


def _check_block(block: Block) -> None:
    where = f"block {block.index} ({block.module or block.attention.core.label()})"
    if block.attention.causal:
        raise TokenPassError(f"token_merge: {where} has causal attention (a decoder); ToMe merges tokens of "
                             "bidirectional encoders only")
    if block.token_axis != 1 or block.input.type.rank != 3:
        raise TokenPassError(f"token_merge: {where}: the token stream {block.input.type} is not [batch, tokens, "
                             f"hidden] (token axis {block.token_axis})")
    if block.attention.kind == "softmax" and block.attention.probs is None:
        raise TokenPassError(f"token_merge: {where}: decomposed attention without explicit probabilities")


def _merge_point(block: Block) -> Node:
    """The node whose output is the stream after attention (+ residual) and before the MLP."""
    if block.norm_position == "pre":
        return block.residual_adds[0]
    return block.norms[0].nodes[-1]


def _keys(graph: Graph, attn: Attention) -> Value:
    """The attention keys as [batch, heads, tokens, head size]."""
    if attn.kind == "sdpa":
        k = attn.core.inputs[1]
    else:
        v = attn.probs.producer.inputs[0]
        while v.producer is not None and v.producer.op != "matmul":
            p = v.producer
            v = p.inputs[1] if p.op == "where" else p.inputs[0]
        if v.producer is None:
            raise TokenPassError(f"token_merge: no scores matmul above {attn.core.label()}")
        kt = v.producer.inputs[1]  # [B, H, d, N]
        p = kt.producer
        if p is not None and p.op == "permute" and tuple(p.attrs["dims"])[-2:] == (3, 2):
            k = p.inputs[0]
        else:
            k = graph.op.permute(kt, dims=(0, 1, 3, 2))
    if k.type.rank != 4:
        raise TokenPassError(f"token_merge: keys of {attn.core.label()} are {k.type}, not [batch, heads, tokens, head]")
    return k


def _proportional_attention(graph: Graph, attn: Attention, sizes: Value) -> None:
    """log(size) on every key's logit: an additive mask for sdpa, an add before the softmax otherwise."""
    op = graph.op
    core = attn.core
    with graph.inserting_before(core):
        bias = op.reshape(op.log(sizes), shape=(sizes.type.shape[0], 1, 1, sizes.type.shape[1]))
        if attn.kind == "sdpa":
            if len(core.inputs) > 3:
                old = core.inputs[3]
                if old.type.dtype == torch.bool and old.is_constant and old.const.numel() == 1 and bool(old.const):
                    graph.set_input(core, 3, bias)
                elif old.type.dtype == torch.bool:
                    graph.set_input(core, 3, op.where(old, bias, graph.add_constant(
                        torch.tensor(float("-inf"), dtype=bias.type.dtype), "neg_inf")))
                else:
                    graph.set_input(core, 3, op.add(old, bias))
            else:
                core.inputs.append(bias)
                bias.uses.append((core, 3))
        else:
            graph.set_input(core, 0, op.add(core.inputs[0], bias))


def _unmerge(graph: Graph, last: Block, source: Value) -> None:
    """Every original token position gets the value of the merged token that holds it."""
    out = last.output
    with graph.inserting_after(out.producer):
        full = graph.op.matmul(graph.op.permute(source, dims=(0, 2, 1)), out)
    changed = {id(full): out.type}
    for user, i in list(out.uses):
        if user is not full.producer:
            graph.set_input(user, i, full)
    graph.outputs = [full if v is out else v for v in graph.outputs]
    retype(graph, changed)
