"""Reference backend: IR -> an executable ``torch.fx.GraphModule`` (``graphopt.ir.interpreter``),
called like the captured model. Each node runs the first ``torch`` kernel of the kernel table that
supports it (``backends/kernels.py``), else its op's reference implementation: the fused low-rank
MLP, for one, runs the Triton kernel on CUDA tensors when triton imports.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

import graphopt.backends.triton_low_rank  # noqa: F401  (registers its kernels)
import graphopt.backends.triton_acm  # noqa: F401  (registers the grouped acm kernels)
import graphopt.backends.sparse_kernels  # noqa: F401  (sparse_linear: C SpMM on CPU, Triton on CUDA)
from graphopt.backends import LoweringError
from graphopt.backends.kernels import select
from graphopt.ir import Graph, Node
from graphopt.ir.interpreter import InterpreterError, to_fx


def kernel_for(target: str):
    """node -> the implementation of the first ``target`` kernel that supports it (None: the reference)."""
    def pick(node: Node):
        kernel, _ = select(target, node)
        return kernel.fn if kernel is not None else None
    return pick


class TorchExecutable(torch.nn.Module):
    """Called like the captured model: same argument structure in, same output structure out.
    ``target``: whose kernels replace the reference implementations (a plugin backend passes its own)."""

    def __init__(self, graph: Graph, target: str = "torch"):
        super().__init__()
        try:
            self.graph_module = to_fx(graph, kernel_for=kernel_for(target))
        except InterpreterError as e:
            raise LoweringError(str(e)) from e
        self._in_spec = graph.meta.get("in_spec")
        self._out_spec = graph.meta.get("out_spec")
        self._user_inputs = graph.meta.get("user_inputs")
        self._layout = graph.meta.get("output_layout")
        self._input_names = [v.name for v in graph.inputs]

    def run_flat(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.graph_module(*tensors)

    def forward(self, *args, **kwargs):
        if self._in_spec is None:
            return self.run_flat(*bind_by_name(self._input_names, args, kwargs))
        flat = flatten_inputs(self._in_spec, args, kwargs)
        tensors = [flat[i] for i, slot in enumerate(self._user_inputs) if slot is not None]
        outputs = self.run_flat(*tensors)
        leaves = [outputs[slot] if isinstance(slot, int) else slot[1] for slot in self._layout]
        return pytree.tree_unflatten(leaves, self._out_spec)


def bind_by_name(names: list[str], args, kwargs) -> list:
    """Inputs of a graph without a captured call structure (read from ONNX): positional in graph
    input order, or by input name."""
    if not kwargs:
        return list(args)
    if len(args) > len(names):
        raise TypeError(f"the graph takes {len(names)} inputs, got {len(args)} positional")
    values = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"unexpected input {name!r}; the graph takes {', '.join(names)}")
        if name in values:
            raise TypeError(f"input {name!r} given twice")
        values[name] = value
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"missing inputs: {', '.join(missing)}")
    return [values[n] for n in names]


def flatten_inputs(in_spec, args, kwargs) -> list:
    """Flatten (args, kwargs) the way the capture did, reordering kwargs to the captured order."""
    kwargs_spec = in_spec.child(1) if in_spec.num_children == 2 else None
    if kwargs_spec is not None and kwargs_spec.context:
        missing = [k for k in kwargs_spec.context if k not in kwargs]
        extra = [k for k in kwargs if k not in kwargs_spec.context]
        if missing or extra:
            raise TypeError(f"inputs differ from the captured ones: missing {missing}, unexpected {extra}")
        kwargs = {k: kwargs[k] for k in kwargs_spec.context}
    flat, spec = pytree.tree_flatten((tuple(args), kwargs))
    if spec != in_spec:
        raise TypeError(f"input structure differs from the captured one:\n  captured {in_spec}\n  got      {spec}")
    return flat


def run(graph: Graph, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run the graph on flat input tensors (one per graph input), returning flat outputs."""
    with torch.no_grad():
        return TorchExecutable(graph).run_flat(*tensors)
