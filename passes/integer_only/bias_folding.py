"""Bias folding: an ``int.linear``'s bias moved into the requantizations that read its output."""
from __future__ import annotations

import torch

from graphopt.ir import Graph


def fold_biases(graph: Graph) -> None:
    """int.linear's bias moves into the requantizations that read it: c += b * m when the requant has no
    pre-shift (exact), c += round(b / 2^pre) * m after a pre-shift (an error below one pre-shifted unit,
    the size of the pre-shift's own truncation). One int32 Add fewer per GEMM at run time; only done
    when the int32 bound of the requant still holds without the bias in its input."""
    for node in graph.find_nodes("int.linear"):
        if len(node.inputs) < 3 or node.inputs[2] is None or not node.inputs[1].is_constant:
            continue
        users = node.output.uses
        if not users or not all(u.op == "int.requant" and i == 0 and u.inputs[1].is_constant
                                and u.inputs[2].is_constant for u, i in users):
            continue
        x_zp = node.attrs["x_zp"]
        x_max = max(x_zp, 255 - x_zp) if node.inputs[0].type.dtype == torch.uint8 else 128
        acc_bound = int(node.inputs[1].const.to(torch.int64).abs().sum(1).max().item()) * x_max
        b = node.inputs[2].const.to(torch.int64)
        folded = []
        for u, _ in users:
            a = u.attrs
            m, c = u.inputs[1].const.to(torch.int64), u.inputs[2].const.to(torch.int64)
            bs = b if a["pre"] == 0 else torch.round(b.double() / 2 ** a["pre"]).to(torch.int64)
            c2 = c + bs * m
            worst = -(-acc_bound // 2 ** a["pre"]) * m.abs().max().item() + (c2 + (-a["lo"]) * 2 ** a["k"]).abs().max().item()
            if worst >= 2 ** 31 - 1:
                break
            folded.append((u, c2))
        else:
            for u, c2 in folded:
                graph.set_input(u, 2, graph.add_constant(c2.to(torch.int32), "rq_cb"))
            bias = node.inputs[2]
            bias.uses.remove((node, 2))
            node.inputs = node.inputs[:2]
    graph.remove_unused_constants()
