"""Frontends: PyTorch (torch.export) and ONNX into the IR.

The frontends' errors are defined here, so callers catch them without importing a frontend's modules.
"""


class FrontendError(Exception):
    """The model holds something the IR cannot represent (or the file cannot be read)."""


class OnnxLoadError(FrontendError):
    """The file is not a usable ONNX model; the message is one line naming the problem."""


class ExportError(Exception):
    """torch.export could not capture the model (opt-cli reports it as a failure, not as bad input)."""


class Unsupported(Exception):
    """A handler has no faithful IR translation for this node: the node stays opaque (``opaque`` for
    ATen, ``onnx_opaque`` for ONNX), with this message as the reason."""


from graphopt.frontends.torch_export import capture, from_exported_program, from_torch  # noqa: E402
from graphopt.frontends.onnx import from_onnx  # noqa: E402

__all__ = ["ExportError", "FrontendError", "OnnxLoadError", "Unsupported", "capture", "from_exported_program",
           "from_onnx", "from_torch"]
