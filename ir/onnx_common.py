"""What the ONNX frontend, the ONNX Runtime backend and ``onnx_opaque`` nodes share: dtype tables, tensor conversion,
and symbolic dim names.

ONNX ``dim_param`` strings become IR dims: a plain name (``batch``) is a symbol of that name, and
a simple arithmetic label (``batch*197``, ``floor(seq/2)``) is parsed into the sympy expression it
spells. The parser is a small recursive-descent one over names, integers, ``+ - * / // ( )`` and
the functions floor/ceiling/Max/Min, so a hostile file never reaches ``eval``. Anything else
becomes a symbol with a sanitized name, and the original string is kept so it is written back.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto

from graphopt.ir.types import DTYPE_NAMES, Dim, canonical_dim, format_dim, symbol

ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.DOUBLE: torch.float64, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}
TORCH_TO_ONNX: dict[torch.dtype, int] = {v: k for k, v in ONNX_TO_TORCH.items()}
assert set(TORCH_TO_ONNX) == set(DTYPE_NAMES), "every IR dtype needs an ONNX element type"

INT64_MAX = 2 ** 63 - 1


def onnx_dtype_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"element type {elem_type}"


def torch_dtype(elem_type: int, where: str = "") -> torch.dtype:
    try:
        return ONNX_TO_TORCH[elem_type]
    except KeyError:
        at = f" ({where})" if where else ""
        raise TypeError(f"ONNX dtype {onnx_dtype_name(elem_type)}{at} has no IR equivalent; the IR supports "
                        f"{', '.join(sorted(DTYPE_NAMES.values()))}") from None


def onnx_dtype(dtype: torch.dtype) -> int:
    return TORCH_TO_ONNX[dtype]


def tensor_from_proto(proto: TensorProto, where: str = "") -> torch.Tensor:
    """An ONNX tensor (data already loaded) as a torch tensor that owns its memory."""
    dtype = torch_dtype(proto.data_type, where or proto.name)
    array = onnx.numpy_helper.to_array(proto)
    if dtype is torch.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def tensor_to_proto(tensor: torch.Tensor, name: str) -> TensorProto:
    """A torch tensor as an ONNX initializer (little-endian raw data, deterministic bytes)."""
    tensor = tensor.detach().cpu().contiguous()
    proto = TensorProto()
    proto.name = name
    proto.data_type = onnx_dtype(tensor.dtype)
    proto.dims.extend(int(d) for d in tensor.shape)
    raw = tensor.view(torch.int16) if tensor.dtype is torch.bfloat16 else tensor
    proto.raw_data = raw.numpy().tobytes()
    return proto


def to_numpy(tensor) -> np.ndarray:
    """torch tensor (or array-like) -> numpy array for an ONNX Runtime feed."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, torch.Tensor):
        if tensor.dtype is torch.bfloat16:
            raise TypeError("bfloat16 tensors cannot be fed to ONNX Runtime from numpy; cast them to float32")
        return tensor.detach().cpu().contiguous().numpy()
    return np.asarray(tensor)


# ---- symbolic dims -------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*/(),]))")
_FUNCS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "ceil": sympy.ceiling, "Max": sympy.Max,
          "Min": sympy.Min, "max": sympy.Max, "min": sympy.Min}


class _Parser:
    def __init__(self, text: str):
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise ValueError(text)
            number, name, punct = m.groups()
            self.tokens.append(("int", number) if number else ("name", name) if name else ("op", punct))
            pos = m.end()
        self.i = 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self, value=None):
        tok = self.peek()
        if tok[0] is None or (value is not None and tok[1] != value):
            raise ValueError("unexpected token")
        self.i += 1
        return tok

    def parse(self):
        expr = self.expr()
        if self.i != len(self.tokens):
            raise ValueError("trailing tokens")
        return expr

    def expr(self):
        value = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self):
        value = self.factor()
        while self.peek() in (("op", "*"), ("op", "/"), ("op", "//")):
            op = self.take()[1]
            rhs = self.factor()
            value = value * rhs if op == "*" else sympy.floor(value / rhs) if op == "//" else value / rhs
        return value

    def factor(self):
        kind, text = self.peek()
        if (kind, text) == ("op", "-"):
            self.take()
            return -self.factor()
        if (kind, text) == ("op", "("):
            self.take()
            value = self.expr()
            self.take(")")
            return value
        if kind == "int":
            self.take()
            return sympy.Integer(int(text))
        if kind == "name":
            self.take()
            if self.peek() == ("op", "("):
                if text not in _FUNCS:
                    raise ValueError(f"unknown function {text}")
                self.take("(")
                args = [self.expr()]
                while self.peek() == ("op", ","):
                    self.take()
                    args.append(self.expr())
                self.take(")")
                return _FUNCS[text](*args)
            return symbol(text)
        raise ValueError("unexpected token")


def parse_dim_param(text: str) -> Dim | None:
    """A dim_param string -> int or sympy expression, or None when it is not a dim expression."""
    if not text or len(text) > 200:
        return None
    try:
        value = _Parser(text).parse()
    except (ValueError, TypeError, ZeroDivisionError):
        return None
    if isinstance(value, sympy.Expr) and value.is_number and not value.is_Integer:
        return None
    try:
        return canonical_dim(value)
    except (TypeError, ValueError):
        return None


def sanitize_symbol_name(text: str) -> str:
    name = re.sub(r"\W", "_", text.strip()) or "dim"
    return name if not name[0].isdigit() else "d_" + name


def dim_to_param(dim: Dim, originals: dict[str, str] | None = None) -> str:
    """An IR dim as an ONNX dim_param string (symbols keep the spelling they were read with)."""
    if originals and isinstance(dim, sympy.Symbol) and dim.name in originals:
        return originals[dim.name]
    return format_dim(dim)
