"""Integer graph inputs that index tables (token ids into embeddings): the bound their values must stay
under. Backends differ outside it (torch raises, ONNX Runtime's Gather wraps negative ids), so callers
check ids against it, and random inputs are drawn below it."""
from __future__ import annotations

from graphopt.ir.graph import Value


def index_bound(value: Value) -> int | None:
    """The rows of the smallest table integer input ``value`` indexes into (embedding rows, a Gather's axis),
    when static; None when it indexes none."""
    bounds = []
    pending, seen = [value], set()
    while pending:
        v = pending.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node in v.users:
            if node.op == "cast" or (node.op == "reshape" and node.inputs[0] is v):
                pending.extend(node.outputs)
            elif node.op == "embedding" and node.inputs[1] is v:
                bounds.append(node.inputs[0].type.shape[0])
            elif node.op in ("index_select", "gather") and node.inputs[1] is v:
                bounds.append(node.inputs[0].type.shape[node.attrs["dim"]])
            elif node.op == "onnx_opaque" and node.attrs["op_type"] in ("Gather", "GatherElements") \
                    and node.inputs[1] is v:
                axis = node.attrs["attributes"].get("axis", 0) if node.attrs["attributes"] is not None else 0
                bounds.append(node.inputs[0].type.shape[axis])
            elif node.op == "onnx_opaque" and node.attrs["op_type"] == "EmbedLayerNormalization":
                position = next(i for i, x in enumerate(node.inputs) if x is v)
                table = {0: 2, 1: 3}.get(position)  # input_ids -> word table, segment_ids -> segment table
                if table is not None and table < len(node.inputs) and node.inputs[table] is not None:
                    bounds.append(node.inputs[table].type.shape[0])
    ints = [b for b in bounds if isinstance(b, int)]
    return min(ints) if ints else None
