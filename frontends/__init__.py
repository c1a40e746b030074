"""Frontends: PyTorch (torch.export) and ONNX into the IR."""


class FrontendError(Exception):
    """The model holds something the IR cannot represent (or the file cannot be read)."""


from graphopt.frontends.torch_export import ExportError, capture, from_exported_program, from_torch  # noqa: E402
from graphopt.frontends.onnx_frontend import OnnxLoadError, from_onnx  # noqa: E402

__all__ = ["ExportError", "FrontendError", "OnnxLoadError", "capture", "from_exported_program", "from_onnx",
           "from_torch"]
