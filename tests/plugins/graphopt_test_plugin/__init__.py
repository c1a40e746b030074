"""A pass author's package, outside graphopt: registers an op and a pass on import."""
import torch

from graphopt.ir import register_op, same_as_input
from graphopt.passes import option, register_pass


@register_op("graphopt_test_plugin.hardswish", inputs=["x"], infer=same_as_input)
def hardswish(x):
    return torch.nn.functional.hardswish(x)


@register_pass("graphopt_test_plugin.relu_to_hardswish", tolerance=None)
def relu_to_hardswish(graph, ctx, *, limit: int = option(-1, "rewrite at most this many relus (-1: all)")):
    """relu(x) -> hardswish(x): a deliberately lossy rewrite for testing plugins."""
    for node in graph.find_nodes("relu")[: None if limit < 0 else limit]:
        with graph.inserting_before(node):
            new = graph.op("graphopt_test_plugin.hardswish", node.inputs[0])
        graph.replace_all_uses_with(node.output, new)
        graph.erase_node(node)
        ctx.count("rewritten")
