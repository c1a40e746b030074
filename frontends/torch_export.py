"""PyTorch frontend: capture with ``torch.export`` (dynamic batch via ``Dim``) and translate the
ATen graph to the IR. Unknown ATen ops become opaque nodes that keep their target; eval-mode
no-ops disappear; when export itself fails the error names the module that failed and why."""
from __future__ import annotations

import inspect
import traceback
from typing import Any

import sympy
import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from graphopt.frontends import ExportError, FrontendError, Unsupported
from graphopt.frontends.aten_ops import DROPPED, HANDLERS, IDENTITY, target_name
from graphopt.frontends.symbols import SymbolTable
from graphopt.ir import Graph, OpError, TensorType, Value
from graphopt.ir.ops.opaque import TensorArg
from graphopt.ir.types import DTYPE_NAMES


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
            dynamic_batch: bool = True, dynamic_shapes=None) -> torch.export.ExportedProgram:
    """``torch.export`` the model; by default axis 0 of every tensor input is one symbolic ``batch``."""
    kwargs = dict(kwargs or {})
    if dynamic_shapes is None and dynamic_batch:
        dynamic_shapes = _batch_dynamic_shapes(model, args, kwargs)
        args, kwargs = _widen_batch(args), _widen_batch(kwargs)
    try:
        ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        return ep.run_decompositions({}) if _mutates(ep) else ep
    except Exception as e:  # torch raises many exception types here; all are reported the same way
        raise ExportError(_describe_export_failure(model, e)) from e


def _mutates(ep: torch.export.ExportedProgram) -> bool:
    """Whether the captured graph holds in-place ATen ops (``add_``, ``fill_`` on a view, ...). The IR
    is functional: such a graph is functionalized first (an empty decomposition table decomposes
    nothing else), so no pass can fold a mutated tensor into a constant or copy a view it writes to."""
    return any(isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
               for module in ep.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function")


def from_torch(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
               dynamic_batch: bool = True, dynamic_shapes=None) -> Graph:
    kwargs = dict(kwargs or {})
    if dynamic_shapes is None and dynamic_batch:
        dynamic_shapes = _batch_dynamic_shapes(model, args, kwargs)
        args, kwargs = _widen_batch(args), _widen_batch(kwargs)
    was_training = model.training
    model.eval()
    try:
        ep = capture(model, args, kwargs, dynamic_batch=False, dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)
    return from_exported_program(ep, type(model).__name__, _dim_names(model, args, kwargs, dynamic_shapes))


def _dim_names(model, args, kwargs, dynamic_shapes) -> dict[str, dict[int, str]]:
    """Top-level input name -> {axis: Dim name}, read from the dynamic_shapes spec."""
    if not dynamic_shapes:
        return {}
    if not isinstance(dynamic_shapes, dict):
        names = list(inspect.signature(model.forward).parameters)
        dynamic_shapes = dict(zip(names, dynamic_shapes))
    out = {}
    for name, spec in dynamic_shapes.items():
        if isinstance(spec, dict) and all(isinstance(k, int) for k in spec):
            out[name] = {axis: getattr(d, "__name__", str(d)) for axis, d in spec.items() if d is not None}
    return out


def from_exported_program(ep: torch.export.ExportedProgram, name: str = "main",
                          dim_names: dict[str, dict[int, str]] | None = None) -> Graph:
    """Translate an ExportedProgram; ``dim_names`` maps an input name to {axis: dim name}."""
    return _Converter(ep, name, dim_names or {}).run()


def _batch_dynamic_shapes(model, args, kwargs):
    batch = Dim("batch")
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise ExportError(f"{type(model).__name__}.forward does not accept the example inputs: {e}") from None
    spec = {}
    for name, value in bound.arguments.items():
        param = inspect.signature(model.forward).parameters[name]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(_batch_spec(v, batch) for v in value)
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: _batch_spec(v, batch) for k, v in value.items()}
        else:
            spec[name] = _batch_spec(value, batch)
    return spec


def _batch_spec(value, batch):
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == 0:
            raise ExportError("an example input has an empty batch (size 0); give at least one example")
        return {0: batch} if value.dim() >= 1 else None
    if isinstance(value, (list, tuple)):
        return type(value)(_batch_spec(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _batch_spec(v, batch) for k, v in value.items()}
    return None


def _widen_batch(value):
    """A batch-1 example (what users have) as a batch of two copies: torch.export specialises a dim of
    size 1 to a constant, so the batch could not stay symbolic. The captured graph runs at any batch."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.dim() >= 1 and value.shape[0] == 1 else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_widen_batch(v) for v in value)
    if isinstance(value, dict):
        return type(value)({k: _widen_batch(v) for k, v in value.items()})
    return value


def _describe_export_failure(model: torch.nn.Module, error: Exception) -> str:
    """Name the innermost submodule on the failing stack, so the user knows where to look."""
    modules = {id(m): name for name, m in model.named_modules()}
    culprit = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in modules:
            path = modules[id(owner)] or "<root>"
            culprit = f"{path} ({type(owner).__name__}, {frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"in module {culprit}" if culprit else f"in {type(model).__name__} (no submodule on the failing stack)"
    hint = ""
    if "specialized it to be a constant" in str(error):
        hint = "; the model fixes that dim to the example's size: capture with dynamic_batch=False"
    return f"torch.export failed {where}: {type(error).__name__}: {reason}{hint}"


_GRAD_MODE_WRAPPERS = {torch.ops.higher_order.wrap_with_set_grad_enabled}
if hasattr(torch.ops.higher_order, "wrap_with_autocast"):
    _GRAD_MODE_WRAPPERS.add(torch.ops.higher_order.wrap_with_autocast)


class _Unrepresentable:
    def __init__(self, reason: str):
        self.reason = reason


class _Converter:
    def __init__(self, ep: torch.export.ExportedProgram, name: str, dim_names: dict[str, dict[int, str]]):
        self.ep = ep
        self.dim_names = dim_names
        self.graph = Graph(name)
        self.symbols = SymbolTable()
        self.env: dict[torch.fx.Node, Any] = {}
        self.scalars: dict[tuple, Value] = {}
        self.current: torch.fx.Node | None = None

    # ---- helpers used by the handlers ----------------------------------------------------
    @property
    def op(self):
        return self.graph.op

    def out_type(self, node: torch.fx.Node) -> TensorType:
        return self._tensor_type(node.meta["val"], node)

    def scalar(self, value, dtype: torch.dtype | None = None) -> Value:
        if dtype is None:
            dtype = torch.bool if isinstance(value, bool) else torch.int64 if isinstance(value, int) else torch.float32
        key = (type(value), value, dtype)
        cached = self.scalars.get(key)
        if cached is None or self.graph.constants.get(cached.name) is not cached:  # or rolled back
            self.scalars[key] = self.graph.add_constant(torch.tensor(value, dtype=dtype), "scalar")
        return self.scalars[key]

    def tensor(self, value, like=None, dtype: torch.dtype | None = None) -> Value:
        """A Value for a tensor operand; Python scalars become 0-d constants (torch promotes
        0-d tensors like scalars, so the result dtype is unchanged)."""
        if isinstance(value, Value):
            return value if dtype is None or value.type.dtype == dtype else self.op.cast(value, dtype=dtype)
        if isinstance(value, (bool, int, float)):
            if dtype is None and isinstance(like, Value) and isinstance(value, float) and like.type.dtype.is_floating_point:
                dtype = like.type.dtype
            return self.scalar(value, dtype)
        raise Unsupported(f"operand {value!r} is not a tensor or a constant scalar")

    # ---- conversion ------------------------------------------------------------------------
    def run(self) -> Graph:
        sig = self.ep.graph_signature
        placeholders = [n for n in self.ep.graph.nodes if n.op == "placeholder"]
        user_inputs: list[int | None] = []
        for spec, node in zip(sig.input_specs, placeholders):
            if spec.kind is InputKind.USER_INPUT:
                if isinstance(node.meta.get("val"), torch.Tensor):
                    self._bind_symbols(node)
                    value = self.graph.add_input(node.name, self.out_type(node))
                    self.env[node] = value
                    user_inputs.append(len(self.graph.inputs) - 1)
                else:
                    self.env[node] = node.meta.get("val")
                    user_inputs.append(None)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                tensor = self.ep.state_dict.get(spec.target)
                if tensor is None:
                    tensor = self.ep.constants[spec.target]
                if isinstance(tensor, torch.nn.Parameter):
                    tensor = tensor.data
                self.env[node] = self.graph.add_constant(tensor, spec.target)
                if spec.kind is not InputKind.PARAMETER:  # buffers (rotary tables, ids) are not learned weights
                    self.graph.meta.setdefault("buffers", []).append(self.env[node].name)
            else:
                raise FrontendError(f"input {node.name}: {spec.kind.name} inputs (e.g. token objects) are not supported")

        for node in self.ep.graph.nodes:
            if node.op == "output":
                self._outputs(node)
            elif node.op != "placeholder":
                self._visit(node, self.ep.graph_module)

        self.graph.meta.update(in_spec=self.ep.call_spec.in_spec, out_spec=self.ep.call_spec.out_spec,
                               user_inputs=user_inputs, symbols=sorted(str(s) for s in self.symbols.names.values()))
        from graphopt.ir import verify
        verify(self.graph)
        return self.graph

    def _visit(self, node: torch.fx.Node, owner: torch.fx.GraphModule) -> None:
        if node.op == "get_attr":
            self.env[node] = getattr(owner, node.target)
        elif node.op == "call_function" and node.target in _GRAD_MODE_WRAPPERS:
            self._inline(node, owner)
        elif node.op == "call_function":
            self.current = node
            self._convert(node)
        else:
            raise FrontendError(f"fx node {node.name}: unexpected op kind {node.op}")

    def _inline(self, node: torch.fx.Node, owner: torch.fx.GraphModule) -> None:
        """Grad-mode and autocast regions change nothing at inference: inline their subgraph."""
        submodule = self.env[node.args[1]]
        operands = [self.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[2:]]
        results = None
        placeholders = iter(operands)
        for inner in submodule.graph.nodes:
            if inner.op == "placeholder":
                self.env[inner] = next(placeholders)
            elif inner.op == "output":
                results = tuple(self.env[a] if isinstance(a, torch.fx.Node) else a for a in inner.args[0])
            else:
                self._visit(inner, submodule)
        self.env[node] = results

    def _bind_symbols(self, node):
        names = self.dim_names.get(node.name, {})
        for axis, size in enumerate(node.meta["val"].shape):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                self.symbols.bind(size.node.expr, names.get(axis, str(size.node.expr)))

    def _tensor_type(self, val, node) -> TensorType:
        if not isinstance(val, torch.Tensor):
            raise FrontendError(f"fx node {node.name}: expected a tensor, got {type(val).__name__}")
        if val.dtype not in DTYPE_NAMES:
            raise FrontendError(f"fx node {node.name} ({node.target}): dtype {val.dtype} is not supported by the IR")
        return TensorType(val.dtype, tuple(self.symbols.convert(s) for s in val.shape))

    def _resolve(self, arg):
        if isinstance(arg, torch.fx.Node):
            value = self.env[arg]
            if isinstance(value, _Unrepresentable):
                raise FrontendError(f"{value.reason}; it is used by fx node {self.current.name} ({self.current.target})")
            return value
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._resolve(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self._resolve(v) for k, v in arg.items()}
        if isinstance(arg, (torch.SymInt,)):
            return self.symbols.convert(arg)
        if isinstance(arg, (torch.device, torch.layout, torch.memory_format)):
            return arg
        return arg

    def _convert(self, node: torch.fx.Node):
        val = node.meta.get("val")
        if node.target in DROPPED:
            return
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool) and node.target is not None \
                and not isinstance(val, torch.Tensor):
            self.env[node] = self.symbols.convert(val)
            return
        if isinstance(val, (torch.SymBool, torch.SymFloat, float, bool)):
            # only an error if a tensor computation consumes it (run-time asserts are dropped)
            self.env[node] = _Unrepresentable(f"fx node {node.name} ({node.target}) computes a symbolic "
                                              f"{type(val).__name__}, which the IR cannot represent")
            return
        args, kwargs = self._resolve(node.args), self._resolve(node.kwargs)
        if node.target in IDENTITY:
            self.env[node] = args[0]
            return
        handler = HANDLERS.find(target_name(node.target))
        with self.graph.checkpoint() as mark:
            if handler is not None:
                try:
                    result = handler(self, node, args, kwargs)
                    if self._matches_meta(result, val):
                        self._annotate(mark, node)
                        self.env[node] = result
                        return
                    reason = "translation does not reproduce the captured type"
                except (Unsupported, OpError) as e:
                    reason = str(e)
                mark.rollback()
            else:
                reason = "no IR op for this ATen op"
            self.env[node] = self._opaque(node, args, kwargs, reason)
            self._annotate(mark, node)

    def _matches_meta(self, result, val) -> bool:
        if isinstance(val, torch.Tensor):
            return isinstance(result, Value) and result.type.matches(self._tensor_type(val, self.current))
        if isinstance(val, (list, tuple)):
            return isinstance(result, (list, tuple)) and len(result) == len(val) and all(
                self._matches_meta(r, v) for r, v in zip(result, val))
        return False

    def _annotate(self, mark, fx_node):
        module = fx_node.meta.get("nn_module_stack") or {}
        path, cls = next(reversed(module.values())) if module else ("", "")
        for node in mark.created_nodes():
            node.meta.setdefault("module", path if isinstance(path, str) else str(path))
            node.meta.setdefault("module_type", cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls)))
            node.meta.setdefault("source", fx_node.name)

    def _opaque(self, node, args, kwargs, reason):
        inputs: list[Value] = []

        def template(a):
            if isinstance(a, Value):
                inputs.append(a)
                return TensorArg(len(inputs) - 1)
            if isinstance(a, (list, tuple)):
                return type(a)(template(x) for x in a)
            if isinstance(a, dict):
                return {k: template(v) for k, v in a.items()}
            return a

        targs, tkwargs = template(args), template(kwargs)
        val = node.meta.get("val")
        vals = list(val) if isinstance(val, (list, tuple)) else [val]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            raise FrontendError(f"fx node {node.name} ({node.target}) returns non-tensor values and has no IR translation ({reason})")
        out_types = tuple(self._tensor_type(v, node) for v in vals)
        target = node.target.name() if hasattr(node.target, "name") else str(node.target)
        ir_node = self.graph.create_node("opaque", inputs, {"target": target, "args": targs, "kwargs": tkwargs,
                                                             "out_types": out_types})
        ir_node.meta["opaque_reason"] = reason
        return tuple(ir_node.outputs) if isinstance(val, (list, tuple)) else ir_node.outputs[0]

    def _outputs(self, node):
        flat = node.args[0]
        outputs, layout = [], []
        for spec, arg in zip(self.ep.graph_signature.output_specs, flat):
            if spec.kind is not OutputKind.USER_OUTPUT:
                raise FrontendError(f"output {spec.arg}: the model mutates {spec.kind.name.lower()} "
                                    f"{spec.target}; only models without in-place state updates are supported")
            value = self.env[arg] if isinstance(arg, torch.fx.Node) else arg
            if isinstance(value, Value):
                layout.append(len(outputs))
                outputs.append(value)
            else:
                layout.append(("const", value))
        self.graph.set_outputs(outputs)
        self.graph.meta["output_layout"] = layout
