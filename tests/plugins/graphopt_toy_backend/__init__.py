"""An outsider's backend, built on graphopt's kernel layer: found through the ``graphopt.backends``
entry point (see ../graphopt_toy_backend-0.1.dist-info), it runs every op on its reference
implementation except ``relu``, for which it brings its own kernel (and counts the calls)."""
import torch

from graphopt.backends.kernels import register_kernel
from graphopt.backends.registry import register_backend
from graphopt.backends.torch_backend import TorchExecutable

CALLS = {"relu": 0}


def _only_float(node):
    return None if node.inputs[0].type.dtype.is_floating_point else "the toy relu is float-only"


@register_kernel("toy", "relu", supports=_only_float)
def toy_relu(x):
    CALLS["relu"] += 1
    return torch.where(x > 0, x, torch.zeros((), dtype=x.dtype))


@register_backend("toy")
def toy_backend(graph):
    return TorchExecutable(graph, target="toy").eval()
