"""Frontends: PyTorch (torch.export) and ONNX into the IR."""
from graphopt.frontends.torch_export import ExportError, FrontendError, capture, from_exported_program, from_torch
from graphopt.frontends.onnx_frontend import OnnxLoadError, from_onnx

__all__ = ["ExportError", "FrontendError", "OnnxLoadError", "capture", "from_exported_program", "from_onnx",
           "from_torch"]
