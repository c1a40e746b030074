"""Pattern-rewriting cost against graph size (issue 4): a rule set on transformer graphs of
25k, 50k and 100k nodes, attention written per head and GELU written with erf, as exporters do.

    python bench/rewrite_scaling.py [--layers 32 64 128] [--heads 96]

Prints nodes, seconds, rewrites fired and microseconds per node; linear matching keeps the last
column flat. JSON goes to bench/results/rewrite_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from graphopt.ir import Graph, TensorType, verify
from graphopt.ir.rewrite import Rule, RuleSet


def transformer_graph(layers: int, heads: int, tokens: int = 4, head_size: int = 2) -> Graph:
    hidden = heads * head_size
    g = Graph(f"transformer_{layers}x{heads}")
    x = g.add_input("x", TensorType(torch.float32, ("batch", tokens, hidden)))
    w = torch.randn(hidden, hidden) / math.sqrt(hidden)
    w1, w2 = torch.randn(4 * hidden, hidden) / math.sqrt(hidden), torch.randn(hidden, 4 * hidden) / math.sqrt(4 * hidden)
    ln_w, ln_b = torch.ones(hidden), torch.zeros(hidden)
    op = g.op
    for _ in range(layers):
        h = op.layer_norm(x, g.add_constant(ln_w), g.add_constant(ln_b), normalized_shape=(hidden,))
        q, k, v = (op.linear(h, g.add_constant(w)) for _ in range(3))
        outs = []
        for i in range(heads):
            part = lambda t: op.slice(t, dim=2, start=i * head_size, end=(i + 1) * head_size)
            scores = op.mul(op.matmul(part(q), op.permute(part(k), dims=(0, 2, 1))), g.add_constant(torch.tensor(head_size ** -0.5)))
            outs.append(op.matmul(op.softmax(scores, dim=-1), part(v)))
        x = op.add(x, op.linear(op.cat(*outs, dim=2), g.add_constant(w)))
        h = op.linear(op.layer_norm(x, g.add_constant(ln_w), g.add_constant(ln_b), normalized_shape=(hidden,)), g.add_constant(w1))
        erf = op.erf(op.div(h, g.add_constant(torch.tensor(math.sqrt(2.0)))))
        gelu = op.mul(op.mul(h, g.add_constant(torch.tensor(0.5))), op.add(erf, g.add_constant(torch.tensor(1.0))))
        x = op.add(x, op.linear(gelu, g.add_constant(w2)))
    g.set_outputs([x])
    return g


def _gelu_pattern(op, x):
    return op.mul(op.mul(x, 0.5), op.add(op.erf(op.div(x, math.sqrt(2.0))), 1.0))


def _gelu_rewrite(op, x):
    """x/2 * (1 + erf(x/sqrt 2)) -> gelu(x)"""
    return op.gelu(x)


def _scaled_softmax_pattern(op, s, c):
    return op.softmax(op.mul(s, c), dim=-1)


def _scaled_softmax_check(ctx, s, c):
    return True if c.is_constant and c.const.numel() == 1 and float(c.const) > 0 else ctx.fail("scale is not a positive constant")


def _linear_gelu_pattern(op, x, w):
    return op.gelu(op.linear(x, w))


RULES = RuleSet("bench_rewrites", [
    Rule("bench.gelu_from_erf", _gelu_pattern, _gelu_rewrite),
    # matches and passes its check everywhere, rewrites to itself (the cost of a rule that fires)
    Rule("bench.scaled_softmax", _scaled_softmax_pattern, lambda op, s, c: op.softmax(op.mul(s, c), dim=-1),
         _scaled_softmax_check),
    # never matches in this graph before the gelu rule runs: a rule that fails at the second node
    Rule("bench.linear_gelu_probe", _linear_gelu_pattern, lambda op, x, w: op.gelu(op.linear(x, w)),
         lambda ctx, x, w: ctx.fail("probe only")),
])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--heads", type=int, default=96)
    args = parser.parse_args()
    rows = []
    for layers in args.layers:
        graph = transformer_graph(layers, args.heads)
        nodes = len(graph)
        start = time.perf_counter()
        counts = RULES.apply(graph, max_sweeps=1)
        seconds = time.perf_counter() - start
        verify(graph)
        rows.append({"layers": layers, "nodes": nodes, "seconds": seconds, "fired": counts,
                     "us_per_node": seconds / nodes * 1e6})
        print(f"{layers:4d} layers  {nodes:7d} nodes  {seconds:7.2f} s  {seconds / nodes * 1e6:6.1f} us/node  {counts}")
    out = Path(__file__).parent / "results" / "rewrite_scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
