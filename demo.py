"""The built-in example: capture a small ViT, run every cleanup pass with numerical checks,
and print the graph summary and the pass report.  ``python -m graphopt.demo``"""
from __future__ import annotations

import torch

import graphopt
from graphopt.zoo import tiny_vit


def main() -> None:
    case = tiny_vit()
    passes = ["decompose_attention", "constant_folding", "cse", "dce"]
    om = graphopt.optimize(case.model, passes, (tuple(case.args), dict(case.kwargs)), check=True)
    print(om.report)
    x = torch.cat([case.args[0], case.args[0]])  # another batch size than captured: the batch dim is symbolic
    with torch.no_grad():
        error = (om(x) - case.model(x)).abs().max().item()
    print(f"capture: {om.report.capture_seconds:.2f} s; ops after: {om.graph.op_counts()}")
    print(f"max abs error vs the original model at batch {x.shape[0]}: {error:.2e}")
    print("first lines of the optimized graph:")
    print("\n".join(str(om.graph).splitlines()[:1] + [l for l in str(om.graph).splitlines() if " = constant" not in l][1:12]))


if __name__ == "__main__":
    main()
