"""Save and load IR graphs (structure, attributes, constants, input/output structure).

The file is a safetensors file: the constants as raw tensors, and the graph's structure as JSON
in the header. Nothing in it is executable: loading parses JSON and tensor bytes, rebuilds every
object from a fixed allow-list of kinds (numbers, strings, tuples, lists, dicts, dtypes, tensor
types, sympy dims built from a few functions, pytree specs of already-registered containers) and
re-creates every node through the op registry, so types are re-checked. Pickles are never read.
"""
from __future__ import annotations

import base64
import importlib
import json
import os
import re
import stat
from typing import Any

import sympy
import torch
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils import _pytree as pytree

from graphopt.ir.files import atomic_write
from graphopt.ir.graph import Graph
from graphopt.ir.opdef import OpError
from graphopt.ir.types import TensorType, symbol
from graphopt.ir.verifier import VerificationError, verify

FORMAT = "graphopt.ir/2"
_KEY = "graphopt"  # the safetensors metadata entry holding the structure

# sympy functions a dim may use (what the frontends produce); nothing else is rebuilt.
_SYMPY_FUNCS = {"Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow, "floor": sympy.floor,
                "ceiling": sympy.ceiling, "Mod": sympy.Mod, "Max": sympy.Max, "Min": sympy.Min}
_MAX_EXPONENT = 64      # |n| of a dim's x**n
_MAX_INT_BITS = 4096    # a dim's integer constants (bounds the work of rebuilding one)
_MAX_EXPR_CHARS = 1000  # a dim expression's JSON (simplifying a huge one could take unbounded time)
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)
_SEQUENCES = {tuple: "tuple", list: "list", immutable_list: "immutable_list"}
_MAPPINGS = {dict: "dict", immutable_dict: "immutable_dict"}
_BY_TAG = {tag: cls for cls, tag in {**_SEQUENCES, **_MAPPINGS}.items()}


class IRFileError(ValueError):
    """A file that is not a readable graphopt IR file, or a graph that cannot be saved."""


# ---- encoding: every non-JSON value becomes [tag, payload...] -------------------------------------
def _encode(x) -> Any:
    from graphopt.ir.ops.onnx_opaque import OnnxAttributes
    from graphopt.ir.ops.opaque import TensorArg

    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return ["float", repr(float(x))]  # keeps nan/inf and every bit through strict JSON
    if type(x) in _SEQUENCES:
        return [_SEQUENCES[type(x)], [_encode(v) for v in x]]
    if type(x) in _MAPPINGS:
        return [_MAPPINGS[type(x)], [[_encode(k), _encode(v)] for k, v in x.items()]]
    if isinstance(x, _TORCH_ENUMS):
        return ["torch", str(x).removeprefix("torch.")]
    if isinstance(x, torch.device):
        return ["device", str(x)]
    if isinstance(x, TensorType):
        return ["type", str(x.dtype).removeprefix("torch."), [_encode(d) for d in x.shape]]
    if isinstance(x, sympy.Basic):
        return ["dim", _encode_expr(x)]
    if isinstance(x, TensorArg):
        return ["arg", x.index]
    if isinstance(x, OnnxAttributes):
        return ["onnx_attributes", [base64.b64encode(b).decode() for b in x.blobs]]
    if isinstance(x, bytes):
        return ["bytes", base64.b64encode(x).decode()]
    if isinstance(x, pytree.TreeSpec):
        return ["treespec", _encode_spec(x)]
    raise IRFileError(f"cannot save a {type(x).__module__}.{type(x).__qualname__} ({x!r:.80}): the IR file "
                      f"holds numbers, strings, containers, dtypes, types, dims and pytree specs only")


def _encode_expr(e: sympy.Basic):
    if e.is_Integer:
        return int(e)
    if e.is_Rational:
        return ["rational", int(e.p), int(e.q)]
    if e.is_Symbol:
        return e.name if e == symbol(e.name) else ["symbol", e.name, e.assumptions0]
    name = type(e).__name__
    if _SYMPY_FUNCS.get(name) is not e.func:
        raise IRFileError(f"cannot save the dim {e}: {name} is not one of {sorted(_SYMPY_FUNCS)}")
    return [name, [_encode_expr(a) for a in e.args]]


def _encode_spec(spec: pytree.TreeSpec):
    if spec.is_leaf():
        return None
    entry = pytree.SUPPORTED_SERIALIZED_TYPES.get(spec.type)
    name = entry.serialized_type_name if entry is not None else None
    if name in (None, pytree.NO_SERIALIZED_TYPE_NAME_FOUND):
        raise IRFileError(f"cannot save a pytree spec of {spec.type.__qualname__}: it has no serialized type name")
    return [name, _encode(spec.context), [_encode_spec(c) for c in spec.children()]]


# ---- decoding: only the tags above, each checked ----------------------------------------------------
class _Bad(Exception):
    """Raised while decoding; load_graph turns it into an IRFileError naming the file."""


def _decode(x) -> Any:
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if not (isinstance(x, list) and x and isinstance(x[0], str)):
        raise _Bad(f"unexpected JSON value {x!r:.80}")
    tag, args = x[0], x[1:]
    if tag == "float" and _shape(args, str):
        try:
            return float(args[0])
        except ValueError:
            raise _Bad(f"bad float {args[0]!r:.40}") from None
    if tag in _BY_TAG and _shape(args, list) and _BY_TAG[tag] in _SEQUENCES:
        return _BY_TAG[tag](_decode(v) for v in args[0])
    if tag in _BY_TAG and _shape(args, list):
        out = {}
        for pair in args[0]:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _Bad("a dict entry is not a [key, value] pair")
            key = _decode(pair[0])
            if not isinstance(key, (str, int, float, bool, tuple, type(None))):
                raise _Bad(f"unhashable dict key {key!r:.40}")
            out[key] = _decode(pair[1])
        return _BY_TAG[tag](out)
    if tag == "torch" and _shape(args, str):
        value = getattr(torch, args[0], None) if args[0].isidentifier() else None
        if not isinstance(value, _TORCH_ENUMS):
            raise _Bad(f"torch.{args[0]:.40} is not a dtype, layout or memory format")
        return value
    if tag == "device" and _shape(args, str):
        try:
            return torch.device(args[0])
        except RuntimeError:
            raise _Bad(f"bad device {args[0]!r:.40}") from None
    if tag == "type" and _shape(args, str, list):
        dtype = getattr(torch, args[0], None) if args[0].isidentifier() else None
        if not isinstance(dtype, torch.dtype):
            raise _Bad(f"bad tensor dtype {args[0]!r:.40}")
        dims = [_decode(d) if isinstance(d, list) else d for d in args[1]]
        if not all(isinstance(d, (int, sympy.Expr)) and not isinstance(d, bool) for d in dims):
            raise _Bad("a tensor dim is not an integer or a dim expression")  # a str would go to sympify (eval)
        try:
            return TensorType(dtype, tuple(dims))
        except (TypeError, ValueError) as e:
            raise _Bad(f"bad tensor type: {e}") from None
    if tag == "dim" and len(args) == 1:
        return _decode_expr(args[0])
    if tag == "arg" and _shape(args, int):
        from graphopt.ir.ops.opaque import TensorArg
        return TensorArg(args[0])
    if tag == "onnx_attributes" and _shape(args, list):
        from graphopt.ir.ops.onnx_opaque import OnnxAttributes
        return OnnxAttributes([_b64(b) for b in args[0]])
    if tag == "bytes" and _shape(args, str):
        return _b64(args[0])
    if tag == "treespec" and len(args) == 1:
        return _decode_spec(args[0])
    raise _Bad(f"unknown or malformed value [{tag!r:.40}, ...]")


def _shape(args, *kinds) -> bool:
    return len(args) == len(kinds) and all(isinstance(a, k) and not isinstance(a, bool) for a, k in zip(args, kinds))


def _b64(text) -> bytes:
    if not isinstance(text, str):
        raise _Bad("bytes are not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise _Bad("bad base64 bytes") from None


def _decode_expr(x) -> sympy.Expr:
    if isinstance(x, list) and len(json.dumps(x)) > _MAX_EXPR_CHARS:
        raise _Bad("a dim expression is too large")
    return _build_expr(x)


def _build_expr(x) -> sympy.Expr:
    if isinstance(x, int) and not isinstance(x, bool):
        if x.bit_length() > _MAX_INT_BITS:
            raise _Bad("a dim constant is too large")
        return sympy.Integer(x)
    if isinstance(x, str):
        if not x.isidentifier():
            raise _Bad(f"bad dim symbol {x!r:.40}")
        return symbol(x)
    if not (isinstance(x, list) and x and isinstance(x[0], str)):
        raise _Bad(f"bad dim expression {x!r:.80}")
    tag, args = x[0], x[1:]
    if tag == "rational" and _shape(args, int, int) and args[1] != 0:
        if max(args[0].bit_length(), args[1].bit_length()) > _MAX_INT_BITS:
            raise _Bad("a dim constant is too large")
        return sympy.Rational(args[0], args[1])
    if tag == "symbol" and _shape(args, str, dict) and args[0].isidentifier():
        if not all(isinstance(k, str) and k.isidentifier() and isinstance(v, (bool, type(None)))
                   for k, v in args[1].items()):
            raise _Bad(f"bad assumptions for dim symbol {args[0]!r:.40}")
        return sympy.Symbol(args[0], **args[1])
    if tag in _SYMPY_FUNCS and _shape(args, list) and args[0]:
        operands = [_build_expr(a) for a in args[0]]
        if tag == "Pow" and not (len(operands) == 2 and operands[1].is_Rational
                                 and abs(operands[1].p) <= _MAX_EXPONENT and abs(operands[1].q) <= _MAX_EXPONENT):
            raise _Bad(f"a dim power needs a small rational exponent, got {args[0][1:]!r:.40}")
        result = _SYMPY_FUNCS[tag](*operands)
        if result.is_Rational and max(int(result.p).bit_length(), int(result.q).bit_length()) > _MAX_INT_BITS:
            raise _Bad("a dim constant is too large")
        return result
    raise _Bad(f"bad dim expression [{tag!r:.40}, ...]")


def _decode_spec(x) -> pytree.TreeSpec:
    if x is None:
        return pytree.treespec_leaf()
    if not (isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and isinstance(x[2], list)):
        raise _Bad("bad pytree spec")
    typ = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(x[0]) or _import_model_output(x[0])
    if typ is None or typ not in pytree.SUPPORTED_NODES:
        raise _Bad(f"the pytree container {x[0]!r:.80} is not registered in this process")
    return pytree.TreeSpec(typ, _decode(x[1]), [_decode_spec(c) for c in x[2]])


def _import_model_output(name: str):
    """transformers' ModelOutput classes register with pytree when their module is imported; import
    that module (installed library code, never code from the file) only for a transformers name."""
    module = name.rpartition(".")[0]
    if re.fullmatch(r"transformers(\.[A-Za-z_][A-Za-z0-9_]*)+", module):
        try:
            importlib.import_module(module)
        except ImportError:
            return None
    return pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name)


# ---- files ---------------------------------------------------------------------------------------
def save_graph(graph: Graph, path: str) -> None:
    from safetensors.torch import save

    structure = {
        "format": FORMAT, "name": graph.name, "meta": _encode(graph.meta),
        "inputs": [[v.name, _encode(v.type)] for v in graph.inputs],
        "constants": list(graph.constants),
        "nodes": [[n.op, [v.name if v is not None else None for v in n.inputs], _encode(n.attrs),
                   [v.name for v in n.outputs], _encode(n.meta)] for n in graph.nodes],
        "outputs": [v.name for v in graph.outputs],
    }
    tensors, storages = {}, set()
    for name, value in graph.constants.items():
        t = value.const.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        tensors[name] = t.clone() if key in storages else t  # safetensors refuses shared storage
        storages.add(key)
    atomic_write(path, save(tensors, metadata={_KEY: json.dumps(structure, allow_nan=False, separators=(",", ":"))}))


def load_graph(path: str) -> Graph:
    """Read a file written by ``save_graph``. Never runs code from the file: any other file, a
    truncated or tampered one gets an IRFileError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise IRFileError(f"{path} is not a regular file")
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise IRFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            structure = json.loads(header[_KEY]) if _KEY in header else None
            if not isinstance(structure, dict) or structure.get("format") != FORMAT:
                raise _Bad(f"no {FORMAT} structure in its header")
            names = structure.get("constants")
            if not (isinstance(names, list) and sorted(names) == sorted(f.keys())):
                raise _Bad("its constants do not match its tensors")
            tensors = {name: f.get_tensor(name) for name in names}
        return _rebuild(structure, tensors)
    except IRFileError:
        raise
    except (_Bad, SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as e:
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            raise IRFileError(f"{path} is a pickle or torch.save file (the IR format before graphopt 0.2, or another "
                              f"torch file); graphopt does not load pickles because loading one can run code. "
                              f"Re-create the graph from its model, or load the old file with torch.load only "
                              f"if you trust it and save it again with graphopt") from None
        raise IRFileError(f"{path} is not a graphopt IR file ({FORMAT}): {e}") from None
    except (OpError, VerificationError, RecursionError, TypeError, ValueError, KeyError, IndexError) as e:
        raise IRFileError(f"{path} is a damaged graphopt IR file: {type(e).__name__}: {e}") from None


def _check_aten_target(target) -> None:
    """An opaque node calls its target when the graph runs: it must name a torch operator overload,
    not some other attribute reachable from ``torch.ops`` (``load_library`` would load any .so)."""
    from graphopt.ir.ops.opaque import resolve_target

    ok = isinstance(target, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*::[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)?", target)
    if not ok or any(part.startswith("__") for part in re.split(r"::|\.", target)):
        raise _Bad(f"opaque target {target!r:.80} is not an operator name like aten::index.Tensor")
    if not isinstance(resolve_target(target), torch._ops.OpOverload):
        raise _Bad(f"opaque target {target!r:.80} is not a torch operator")


def _decode_dict(x, what: str) -> dict:
    value = _decode(x)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _Bad(f"{what}: not a dict with string keys")
    return value


def _rebuild(structure: dict, tensors: dict[str, torch.Tensor]) -> Graph:
    g = Graph(_decode(structure["name"]))
    g.meta = _decode_dict(structure["meta"], "the graph's meta")
    values = {}

    def define(name, value):
        if value.name != name or name in values:
            raise _Bad(f"value name %{name} appears twice")
        values[name] = value

    def lookup(name):
        if name not in values:
            raise _Bad(f"%{name!r:.40} is used before it is defined")
        return values[name]

    for name, t in structure["inputs"]:
        define(name, g.add_input(name, _decode(t)))
    for name in structure["constants"]:
        define(name, g.add_constant(tensors[name], name))
    for op, inputs, attrs, outs, meta in structure["nodes"]:
        if not (isinstance(op, str) and isinstance(inputs, list) and isinstance(outs, list)):
            raise _Bad("a node is not [op, inputs, attrs, outputs, meta]")
        attrs = _decode_dict(attrs, f"attributes of a {op} node")
        if op == "opaque":
            _check_aten_target(attrs.get("target"))
        node = g.create_node(op, [lookup(i) if i is not None else None for i in inputs], attrs, names=outs,
                             meta=_decode_dict(meta, f"meta of a {op} node"))
        if len(node.outputs) != len(outs):
            raise _Bad(f"node {node.label()} has {len(node.outputs)} outputs, the file names {len(outs)}")
        for name, v in zip(outs, node.outputs):
            define(name, v)
    g.set_outputs([lookup(n) for n in structure["outputs"]])
    verify(g)
    return g
