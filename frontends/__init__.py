"""Frontends: PyTorch (torch.export) and ONNX into the IR."""
from graphopt.frontends.torch_export import ExportError, FrontendError, capture, from_exported_program, from_torch

__all__ = ["ExportError", "FrontendError", "capture", "from_exported_program", "from_torch"]
