"""ATen -> IR op mapping for the torch.export frontend.

Each handler gets the converter and the fx node's arguments (fx nodes already replaced by IR
Values, SymInts by sympy dims) and returns the IR Value(s), or raises ``Unsupported`` to make the
node opaque. Shapes of view-like ops are read from the node's fake tensor, so they are exact
and symbolic.

Handlers are registered in ``HANDLERS`` under the target's name (``target_name``: ``aten::add.Tensor``,
as opaque nodes and the ONNX backend's ATen lowerings spell it); a plugin adds its own from a module
named in the entry-point group ``graphopt.aten_handlers``. A target that has a handler already is
refused unless ``replace=True``.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch

from graphopt.frontends import Unsupported
from graphopt.ir import Value
from graphopt.ir.ops.shape import BIG
from graphopt.ir.registry import Registry

aten = torch.ops.aten
HANDLERS: Registry[Callable] = Registry("ATen handler", group="graphopt.aten_handlers")

# eval-mode no-ops and metadata asserts: the value passes through (or nothing is produced)
IDENTITY = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
            aten.lift_fresh_copy.default, aten.dropout.default, aten.feature_dropout.default,
            aten.alpha_dropout.default, aten.native_dropout.default}
DROPPED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default,
           aten._assert_async.msg}


def target_name(target) -> str:
    """``aten::linear`` / ``aten::add.Tensor`` for an ATen overload, ``operator.getitem`` for a Python function."""
    if isinstance(target, torch._ops.OpOverload):
        return target.name()
    return f"{getattr(target, '__module__', '').lstrip('_')}.{getattr(target, '__qualname__', target)}"


def handles(*targets, replace: bool = False):
    """``@handles(aten.add.Tensor, aten.add.Scalar)``: register the handler under each target's name."""
    return HANDLERS.decorator(*(target_name(t) for t in targets), replace=replace)


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


@handles(aten.linear.default)
def _linear(cv, node, args, kwargs):
    return cv.op.linear(args[0], args[1], _arg(args, kwargs, 2, "bias"))


@handles(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _matmul(cv, node, args, kwargs):
    return cv.op.matmul(args[0], args[1])


@handles(aten.addmm.default)
def _addmm(cv, node, args, kwargs):
    if _arg(args, kwargs, 3, "beta", 1) != 1 or _arg(args, kwargs, 4, "alpha", 1) != 1:
        raise Unsupported("addmm with beta/alpha != 1")
    return cv.op.add(cv.op.matmul(args[1], args[2]), args[0])


def _pairs(v) -> tuple:
    return tuple(v) * 2 if len(v) == 1 else tuple(v)


def _conv2d_with(cv, args, kwargs, padding):
    """aten.conv2d's operands (both overloads share them but for padding) as a conv2d with numeric padding."""
    return cv.op.conv2d(args[0], args[1], _arg(args, kwargs, 2, "bias"), stride=_pairs(_arg(args, kwargs, 3, "stride", [1])),
                        padding=padding, dilation=_pairs(_arg(args, kwargs, 5, "dilation", [1])),
                        groups=_arg(args, kwargs, 6, "groups", 1))


@handles(aten.conv2d.default)
def _conv2d(cv, node, args, kwargs):
    return _conv2d_with(cv, args, kwargs, _pairs(_arg(args, kwargs, 4, "padding", [0])))


@handles(aten.conv2d.padding)
def _conv2d_padding(cv, node, args, kwargs):
    """Conv2d(padding="valid" | "same") (SigLIP's patch embedding): "valid" is no padding; "same" (stride 1) pads
    dilation (k - 1) / 2 a side, which is symmetric only when that total is even (torch puts the odd one after)."""
    mode, dilation = _arg(args, kwargs, 4, "padding", "valid"), _pairs(_arg(args, kwargs, 5, "dilation", [1]))
    kernel = tuple(args[1].type.shape[2:])
    if mode == "valid":
        padding = (0, 0)
    elif all(isinstance(k, int) and d * (k - 1) % 2 == 0 for k, d in zip(kernel, dilation)):
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    else:
        raise Unsupported(f"conv2d padding='same' with kernel {kernel} and dilation {dilation} pads unevenly")
    return _conv2d_with(cv, args, kwargs, padding)


def _binary(ir_op):
    def handler(cv, node, args, kwargs):
        a, b = cv.tensor(args[0]), cv.tensor(args[1], like=args[0])
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if alpha != 1:
            b = cv.op.mul(b, cv.scalar(alpha))
        return cv.op(ir_op, a, b)
    return handler


for _t, _op in [(aten.add.Tensor, "add"), (aten.add.Scalar, "add"), (aten.sub.Tensor, "sub"),
                (aten.sub.Scalar, "sub"), (aten.mul.Tensor, "mul"), (aten.mul.Scalar, "mul"),
                (aten.div.Tensor, "div"), (aten.div.Scalar, "div"), (aten.pow.Tensor_Scalar, "pow"),
                (aten.pow.Tensor_Tensor, "pow"), (aten.maximum.default, "maximum"),
                (aten.minimum.default, "minimum"),
                (aten.eq.Tensor, "eq"), (aten.eq.Scalar, "eq"), (aten.ne.Tensor, "ne"), (aten.ne.Scalar, "ne"),
                (aten.lt.Tensor, "lt"), (aten.lt.Scalar, "lt"), (aten.le.Tensor, "le"), (aten.le.Scalar, "le"),
                (aten.gt.Tensor, "gt"), (aten.gt.Scalar, "gt"), (aten.ge.Tensor, "ge"), (aten.ge.Scalar, "ge"),
                (aten.logical_and.default, "logical_and"), (aten.logical_or.default, "logical_or")]:
    HANDLERS.register(target_name(_t), _binary(_op))


@handles(aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.__or__.Tensor, aten.bitwise_or.Tensor)
def _bool_logic(cv, node, args, kwargs):
    a, b = cv.tensor(args[0]), cv.tensor(args[1], like=args[0])
    if a.type.dtype != torch.bool or b.type.dtype != torch.bool:
        raise Unsupported("bitwise op on integers")
    is_and = node.target in (aten.__and__.Tensor, aten.bitwise_and.Tensor)
    return cv.op.logical_and(a, b) if is_and else cv.op.logical_or(a, b)


@handles(aten.bitwise_not.default, aten.logical_not.default)
def _not(cv, node, args, kwargs):
    if node.target is aten.bitwise_not.default and args[0].type.dtype != torch.bool:
        raise Unsupported("bitwise_not on integers")
    return cv.op.logical_not(args[0])


@handles(aten.isnan.default)
def _isnan(cv, node, args, kwargs):
    return cv.op.isnan(args[0])


@handles(aten.div.Tensor_mode)
def _div_mode(cv, node, args, kwargs):
    mode = kwargs.get("rounding_mode", args[2] if len(args) > 2 else None)
    return cv.op.div(cv.tensor(args[0]), cv.tensor(args[1], like=args[0]), rounding_mode=mode or "none")


@handles(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(cv, node, args, kwargs):
    a, b = cv.tensor(args[0]), cv.tensor(args[1], like=args[0])
    alpha = kwargs.get("alpha", 1)
    if alpha != 1:
        a = cv.op.mul(a, cv.scalar(alpha))
    return cv.op.sub(b, a)


_UNARY = {aten.relu.default: "relu", aten.silu.default: "silu", aten.tanh.default: "tanh",
          aten.sigmoid.default: "sigmoid", aten.exp.default: "exp", aten.log.default: "log",
          aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt", aten.erf.default: "erf",
          aten.neg.default: "neg", aten.abs.default: "abs", aten.reciprocal.default: "reciprocal",
          aten.sin.default: "sin", aten.cos.default: "cos", aten.floor.default: "floor",
          aten.round.default: "round", aten.sign.default: "sign"}
for _t, _op in _UNARY.items():
    HANDLERS.register(target_name(_t), (lambda op_name: lambda cv, node, args, kwargs: cv.op(op_name, args[0]))(_op))


@handles(aten.gelu.default)
def _gelu(cv, node, args, kwargs):
    return cv.op.gelu(args[0], approximate=_arg(args, kwargs, 1, "approximate", "none"))


@handles(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.hardtanh.default)
def _clamp(cv, node, args, kwargs):
    if node.target is aten.clamp_min.default:
        lo, hi = args[1], None
    elif node.target is aten.clamp_max.default:
        lo, hi = None, args[1]
    elif node.target is aten.hardtanh.default:
        lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    else:
        lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    if isinstance(lo, Value) or isinstance(hi, Value):
        raise Unsupported("clamp with tensor bounds")
    return cv.op.clamp(args[0], min=lo, max=hi)


@handles(aten.softmax.int, aten._softmax.default)
def _softmax(cv, node, args, kwargs):
    if node.target is aten.softmax.int and _arg(args, kwargs, 2, "dtype") is not None:
        raise Unsupported("softmax with a dtype")
    if node.target is aten._softmax.default and args[2]:
        raise Unsupported("half_to_float softmax")
    return cv.op.softmax(args[0], dim=args[1])


@handles(aten.layer_norm.default)
def _layer_norm(cv, node, args, kwargs):
    return cv.op.layer_norm(args[0], _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"),
                            normalized_shape=tuple(args[1]), eps=float(_arg(args, kwargs, 4, "eps", 1e-5)))


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(cv, node, args, kwargs):
    if _arg(args, kwargs, 4, "dropout_p", 0.0) != 0.0 or kwargs.get("enable_gqa", False):
        raise Unsupported("sdpa with dropout or grouped-query attention")
    mask = _arg(args, kwargs, 3, "attn_mask")
    scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
    return cv.op.sdpa(args[0], args[1], args[2], mask, is_causal=bool(_arg(args, kwargs, 5, "is_causal", False)),
                      scale=None if scale is None else float(scale))


@handles(aten.embedding.default)
def _embedding(cv, node, args, kwargs):
    return cv.op.embedding(args[0], args[1])


@handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
         aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
         aten.view_as.default, aten.reshape_as.default)
def _reshape(cv, node, args, kwargs):
    shape = cv.out_type(node).shape
    if tuple(shape) == tuple(args[0].type.shape):
        return args[0]
    return cv.op.reshape(args[0], shape=shape)


@handles(aten.permute.default)
def _permute(cv, node, args, kwargs):
    return cv.op.permute(args[0], dims=tuple(d % max(args[0].type.rank, 1) for d in args[1]))


@handles(aten.transpose.int, aten.t.default, aten.numpy_T.default)
def _transpose(cv, node, args, kwargs):
    rank = args[0].type.rank
    if node.target is aten.transpose.int:
        d0, d1 = args[1] % rank, args[2] % rank
    else:
        d0, d1 = rank - 2, rank - 1
    if rank < 2:
        return args[0]
    dims = list(range(rank))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return cv.op.permute(args[0], dims=tuple(dims))


@handles(aten.expand.default, aten.expand_as.default)
def _expand(cv, node, args, kwargs):
    shape = cv.out_type(node).shape
    if tuple(shape) == tuple(args[0].type.shape):
        return args[0]
    return cv.op.expand(args[0], shape=shape)


@handles(aten.cat.default, aten.concat.default)
def _cat(cv, node, args, kwargs):
    tensors = [t for t in args[0] if t.type.numel() != 0]
    return cv.op.cat(*tensors, dim=_arg(args, kwargs, 1, "dim", 0))


@handles(aten.slice.Tensor)
def _slice(cv, node, args, kwargs):
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim", 0)
    start = _arg(args, kwargs, 2, "start") or 0
    end = _arg(args, kwargs, 3, "end")
    step = _arg(args, kwargs, 4, "step", 1)
    end = BIG if end is None else end
    if start == 0 and step == 1 and cv.out_type(node).matches(x.type):
        return x
    return cv.op.slice(x, dim=dim, start=start, end=end, step=step)


@handles(aten.select.int)
def _select(cv, node, args, kwargs):
    return cv.op.select(args[0], dim=args[1], index=args[2])


@handles(aten.gather.default)
def _gather(cv, node, args, kwargs):
    return cv.op.gather(args[0], args[2], dim=args[1])


@handles(aten.index_select.default)
def _index_select(cv, node, args, kwargs):
    return cv.op.index_select(args[0], args[2], dim=args[1])


def _reduce(ir_op):
    def handler(cv, node, args, kwargs):
        dims = _arg(args, kwargs, 1, "dim")
        if node.target in (aten.mean.default, aten.sum.default):
            dims, keepdim, dtype = (), False, kwargs.get("dtype")
        else:
            keepdim, dtype = bool(_arg(args, kwargs, 2, "keepdim", False)), kwargs.get("dtype")
        dims = tuple([dims] if isinstance(dims, int) else (dims or ()))
        extra = {} if ir_op == "amax" else {"dtype": dtype}
        return cv.op(ir_op, args[0], dims=dims, keepdim=keepdim, **extra)
    return handler


for _t, _op in [(aten.mean.dim, "mean"), (aten.mean.default, "mean"), (aten.sum.dim_IntList, "sum"),
                (aten.sum.default, "sum"), (aten.amax.default, "amax")]:
    HANDLERS.register(target_name(_t), _reduce(_op))


@handles(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
         aten.to.other)
def _to(cv, node, args, kwargs):
    target = cv.out_type(node).dtype
    if target == args[0].type.dtype:
        return args[0]
    return cv.op.cast(args[0], dtype=target)


@handles(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(cv, node, args, kwargs):
    out = cv.out_type(node)
    a = cv.tensor(args[1], dtype=out.dtype)
    b = cv.tensor(args[2], dtype=out.dtype)
    return cv.op.where(args[0], a, b)


@handles(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(cv, node, args, kwargs):
    x, mask, value = args
    return cv.op.where(mask, cv.tensor(value, dtype=x.type.dtype), x)


@handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(cv, node, args, kwargs):
    dtype = cv.out_type(node).dtype
    if node.target is aten.arange.default:
        start, end, step = 0, args[0], 1
    else:
        start, end = args[0], args[1]
        step = _arg(args, kwargs, 2, "step", 1)
    if not all(isinstance(v, int) or hasattr(v, "free_symbols") for v in (start, end, step)):
        raise Unsupported("arange over floats")
    return cv.op.arange(start=start, end=end, step=step, dtype=dtype)


@handles(aten.full.default, aten.zeros.default, aten.ones.default, aten.new_ones.default, aten.new_zeros.default,
         aten.new_full.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
         aten.scalar_tensor.default)
def _full(cv, node, args, kwargs):
    out = cv.out_type(node)
    name = node.target._overloadpacket.__name__
    if "zeros" in name:
        value = 0
    elif "ones" in name:
        value = 1
    elif name == "scalar_tensor":
        value = args[0]
    else:
        value = args[-1] if name in ("full", "new_full", "full_like") else None
    if isinstance(value, Value) or not isinstance(value, (int, float, bool)):
        raise Unsupported(f"{name} with a non-constant fill value")
    return cv.op.full(shape=out.shape, value=value, dtype=out.dtype)


@handles(operator.getitem)
def _getitem(cv, node, args, kwargs):
    container, index = args
    if isinstance(container, (list, tuple)):
        return container[index]
    raise Unsupported("getitem on a tensor")


@handles(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def _split(cv, node, args, kwargs):
    """split/chunk -> one slice per piece, sized from the captured output types."""
    x, dim = args[0], _arg(args, kwargs, 2, "dim", 0)
    pieces, start = [], 0
    for val in node.meta["val"]:
        length = cv._tensor_type(val, node).shape[dim]
        pieces.append(cv.op.slice(x, dim=dim, start=start, end=start + length))
        start = start + length
    return pieces
