"""Backends lower the IR to something that runs."""


class LoweringError(Exception):
    """The graph cannot be lowered to this backend."""


from graphopt.backends.torch_backend import TorchExecutable  # noqa: E402  (needs LoweringError above)

__all__ = ["LoweringError", "TorchExecutable"]
