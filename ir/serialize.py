"""Save and load IR graphs (structure, attributes, constants, input/output structure) with
``torch.save``. Loading re-creates every node through the op registry, so types are re-checked.
Files are pickles: load only files you trust."""
from __future__ import annotations

import os
import tempfile

import torch

from graphopt.ir.graph import Graph

FORMAT = "graphopt.ir/1"


def save_graph(graph: Graph, path: str) -> None:
    payload = {
        "format": FORMAT, "name": graph.name, "meta": graph.meta,
        "inputs": [(v.name, v.type) for v in graph.inputs],
        "constants": {name: v.const for name, v in graph.constants.items()},
        "nodes": [(n.op, [v.name if v is not None else None for v in n.inputs], n.attrs,
                   [v.name for v in n.outputs], n.meta) for n in graph.nodes],
        "outputs": [v.name for v in graph.outputs],
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_graph(path: str) -> Graph:
    payload = torch.load(path, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a graphopt IR file (expected format {FORMAT})")
    g = Graph(payload["name"])
    g.meta = payload["meta"]
    values = {}
    for name, t in payload["inputs"]:
        values[name] = g.add_input(name, t)
    for name, tensor in payload["constants"].items():
        values[name] = g.add_constant(tensor, name)
    for op, inputs, attrs, outs, meta in payload["nodes"]:
        node = g.create_node(op, [values[i] if i is not None else None for i in inputs], attrs, names=outs, meta=meta)
        for name, v in zip(outs, node.outputs):
            if v.name != name:
                raise ValueError(f"{path}: value name %{name} appears twice")
            values[name] = v
    g.set_outputs([values[n] for n in payload["outputs"]])
    return g
