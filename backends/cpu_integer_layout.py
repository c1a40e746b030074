"""Attention's output written in the layout and scale its consumer reads. ``cpu.int_bmm -> permute`` becomes one
``cpu.int_bmm`` with ``out_perm``: probabilities x V ([B, H, T, D]) land as [B, T, H, D], so the reshape to
[B, T, H D] after them is a view, not a copy (the kernel writes with strides; on ONNX Runtime the Transpose node
goes too). The requant that follows (the output projection's input scale, per tensor before the heads merge or
per column after it) joins the kernel's epilogue as a second requant, its columns read per head::

    y = cpu.int_bmm(p, v, kind=requant)             y = cpu.int_bmm(p, v, m2, c2, kind=requant_requant,
    z = permute(y, dims=(0, 2, 1, 3))        ->                     out_perm=(0, 2, 1, 3))
    w = cpu.int_requant(reshape(z, [B, T, H D]))    w = reshape(y, [B, T, H D])

``fold_attention_outputs`` applies both, in that order of the chain. ``fold_key_head_sums`` lets a token merge
read its keys per head (the sum over heads inside its kernel). ``fold_patchify`` has a ViT's input quantizer write
the image's patches, the layout its patch embedding reads::

    q = cpu.int_quantize(x)                          [B, C, H, W]
    r = reshape(q, [B, C, H/ph, ph, W/pw, pw])  ->   p = cpu.int_quantize(x, patch=(ph, pw))   [B, H/ph, W/pw, C, ph, pw]
    p = permute(r, dims=(0, 2, 4, 1, 3, 5))                    (patch=(ph, pw, C, H, W), checked on each call)
"""
from __future__ import annotations

import torch

from graphopt.backends.cpu_integer_rows import _input
from graphopt.ir import Graph, Node
from graphopt.ir.ops.integer import INT_DTYPES
from graphopt.ir.types import dims_equal


def _sole_user(node: Node, op: str, outputs: set[int]) -> Node | None:
    y = node.outputs[0]
    users = y.users
    if id(y) in outputs or len(users) != 1 or users[0].op != op or users[0].inputs[0] is not y:
        return None
    return users[0]


def _matches(graph: Graph, find):
    """(node, what find(node, outputs) returned) for each node of graph (as it was) where that is not None;
    outputs: the ids of the graph's outputs, which no fold may take away."""
    outputs = {id(v) for v in graph.outputs}
    for node in list(graph.nodes):
        found = find(node, outputs)
        if found is not None:
            yield node, found


def _foldable_permute(node: Node, outputs: set[int]) -> Node | None:
    """The permute that node's output alone feeds, when the kernel can write that layout itself."""
    if node.op != "cpu.int_bmm" or node.attrs["out_perm"] or _input(node, "pow2")[1] is not None \
            or node.outputs[0].type.rank != 4:
        return None
    permute = _sole_user(node, "permute", outputs)
    return permute if permute is not None and permute.attrs["dims"][-1] % 4 == 3 else None


def fold_output_permutes(graph: Graph) -> int:
    """Fold each attention output's permute into its ``cpu.int_bmm`` (in place); returns how many."""
    folded = 0
    for node, permute in _matches(graph, _foldable_permute):
        attrs = dict(node.attrs, out_perm=tuple(d % 4 for d in permute.attrs["dims"]))
        with graph.inserting_before(node):
            new = graph.create_node(node.op, list(node.inputs), attrs, meta=dict(node.meta))
        graph.replace_all_uses_with(permute.outputs[0], new.outputs[0])
        graph.erase_node(permute)
        graph.erase_node(node)
        folded += 1
    return folded


def _foldable_requant(node: Node, outputs: set[int]) -> tuple[Node | None, Node] | None:
    """(reshape or None, requant) after a bmm of kind requant: the requant reads the bmm's output itself
    (per-tensor m, c, or per column of its N), or that output [.., H, D] (heads next to the columns: out_perm)
    through a reshape merging H and D (m, c per-tensor or per merged column). m and c are constants, and the
    bmm's own requant stores its values exactly (they go on into the second requant unstored)."""
    if node.op != "cpu.int_bmm" or node.attrs["kind"] != "requant" or _input(node, "pow2")[1] is not None \
            or _input(node, "live")[1] is not None or node.outputs[0].type.rank != 4:
        return None
    shape = node.outputs[0].type.shape
    reshape = None
    requant = _sole_user(node, "cpu.int_requant", outputs)
    if requant is None and tuple(node.attrs["out_perm"][2:]) == (1, 3):
        reshape = _sole_user(node, "reshape", outputs)
        requant = None if reshape is None else _sole_user(reshape, "cpu.int_requant", outputs)
        merged = None if reshape is None else reshape.outputs[0].type.shape
        if requant is None or len(merged) != 3 or not all(isinstance(d, int) for d in shape[2:]) \
                or merged[2] != shape[2] * shape[3]:
            return None
    if requant is None or len(requant.inputs) > 3 or not all(v.is_constant for v in requant.inputs[1:3]) \
            or any(v.const.numel() not in (1, requant.outputs[0].type.shape[-1]) for v in requant.inputs[1:3]):
        return None
    info = torch.iinfo(INT_DTYPES[node.attrs["out"]])
    a = node.attrs
    if not info.min <= a["lo"] + a["zp"] <= a["hi"] + a["zp"] <= info.max:
        return None
    return reshape, requant


def _per_head(const: torch.Tensor, heads: int, columns: int, merged: bool) -> torch.Tensor:
    """m or c of the second requant as the kernel reads it: a row of the N columns for each head."""
    row = const.reshape(-1).to(torch.int32)
    if merged:                                    # per merged column h D + d
        return row.expand(heads * columns).reshape(heads, columns).contiguous()
    return row.expand(columns).expand(heads, columns).contiguous()


def fold_output_requants(graph: Graph) -> list[tuple[Node, Node]]:
    """Fold the requant after each attention output (itself, or its heads merged by fold_output_permutes'
    layout) into its ``cpu.int_bmm`` as a second requant (in place); returns each new kernel with the requant
    it took in."""
    folded = []
    for node, (reshape, requant) in _matches(graph, _foldable_requant):
        result = node.inputs[0].type.shape[:-1] + (node.inputs[1].type.shape[-1],)
        heads, columns = result[1], result[3]
        inputs = list(node.inputs) + [None] * (len(node.schema.inputs) - len(node.inputs))
        for name, v in (("m2", requant.inputs[1]), ("c2", requant.inputs[2])):
            inputs[_input(node, name)[0]] = graph.add_constant(_per_head(v.const, heads, columns, reshape is not None))
        r = requant.attrs
        attrs = dict(node.attrs, kind="requant_requant", out=r["out"], pre2=r["pre"], k2=r["k"], lo2=r["lo"],
                     hi2=r["hi"], zp2=r["zp"])
        with graph.inserting_before(node):
            new = graph.create_node(node.op, inputs, attrs, meta=dict(node.meta))
        result_value = new.outputs[0]
        if reshape is not None:
            with graph.inserting_before(requant):
                result_value = graph.create_node("reshape", [new.outputs[0]], dict(reshape.attrs)).outputs[0]
        graph.replace_all_uses_with(requant.outputs[0], result_value)
        graph.erase_node(requant)
        if reshape is not None:
            graph.erase_node(reshape)
        graph.erase_node(node)
        folded.append((new, requant))
    return folded


def fold_key_head_sums(graph: Graph) -> int:
    """A token merge whose keys are the int32 sum over the heads of a 4-D 8- or 32-bit value ([B, H, N, d] or
    [B, N, H, d]) reads that value and sums each token's heads itself (``heads_axis``; in place); returns how
    many. The sum was a torch op walking a permuted view on one thread, 0.33 ms a layer of DeiT-S b8 with token
    merging."""
    outputs = {id(v) for v in graph.outputs}
    folded = 0
    for node in list(graph.nodes):
        keys = node.inputs[1] if node.op == "cpu.int_token_merge" and not node.attrs["heads_axis"] else None
        total = None if keys is None else keys.producer
        if total is None or total.op != "sum" or id(keys) in outputs or len(keys.users) != 1 \
                or total.attrs["keepdim"] or len(total.attrs["dims"]) != 1:
            continue
        heads = total.inputs[0]
        axis = total.attrs["dims"][0] % 4 if heads.type.rank == 4 else None
        if axis not in (1, 2) or heads.type.dtype not in (torch.uint8, torch.int8, torch.int32) \
                or keys.type.dtype != torch.int32:
            continue
        with graph.inserting_before(node):
            new = graph.create_node(node.op, [node.inputs[0], heads, node.inputs[2]], dict(node.attrs, heads_axis=axis),
                                    meta=dict(node.meta))
        for old, value in zip(node.outputs, new.outputs):
            graph.replace_all_uses_with(old, value)
        graph.erase_node(node)
        graph.erase_node(total)
        folded += 1
    return folded


def fold_attention_outputs(graph: Graph) -> list[tuple[Node, Node]]:
    """All three folds, in chain order (a requant right after the bmm, the permute, a requant after the heads
    merge); returns each kernel with the requant it took in."""
    graph.remove_dead()          # a fusion's leftover layout ops would count as the bmm's second user
    before = fold_output_requants(graph)
    fold_output_permutes(graph)
    return before + fold_output_requants(graph)


PATCH_DIMS = (0, 2, 4, 1, 3, 5)


def _patch_of(quantize: Node, outputs: set[int]) -> tuple[tuple[int, ...], Node] | None:
    """((ph, pw, C, H, W), the permute) when quantize's output alone feeds reshape [B, C, H/ph, ph, W/pw, pw] then
    permute (0, 2, 4, 1, 3, 5), a ViT's patchify; else None."""
    if quantize.op != "cpu.int_quantize" or quantize.attrs.get("patch"):
        return None
    x = quantize.inputs[0].type
    reshape = _sole_user(quantize, "reshape", outputs)
    permute = _sole_user(reshape, "permute", outputs) if reshape is not None else None
    if permute is None or tuple(permute.attrs["dims"]) != PATCH_DIMS or x.rank != 4:
        return None
    (B, C, H, W), view = x.shape, tuple(reshape.outputs[0].type.shape)
    if not all(isinstance(d, int) for d in (C, H, W) + view[1:]) or not dims_equal(view[0], B):
        return None
    if view[1] != C or view[2] * view[3] != H or view[4] * view[5] != W:
        return None
    return (view[3], view[5], C, H, W), permute


def fold_patchify(graph: Graph) -> list[Node]:
    """Each input quantizer followed by a ViT's patchify made to write the patches itself (in place); returns the
    new quantizers."""
    folded = []
    for node, (patch, permute) in _matches(graph, _patch_of):
        with graph.inserting_before(node):
            new = graph.create_node(node.op, list(node.inputs), dict(node.attrs, patch=patch), meta=dict(node.meta))
        graph.replace_all_uses_with(permute.outputs[0], new.outputs[0])
        reshape = permute.inputs[0].producer
        graph.erase_node(permute)
        graph.erase_node(reshape)
        graph.erase_node(node)
        folded.append(new)
    return folded
