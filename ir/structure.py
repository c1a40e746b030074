"""Transformer structure analysis: the blocks of a graph, in order, and what each is made of.

Works on graphs from either frontend, before or after ``decompose_attention``: it starts from each
attention core (an ``sdpa`` node, or a ``softmax`` between two matmuls), walks up to the q/k/v
projections and down to the output projection and the residual add, then finds the MLP and the
norms around it. A core that does not complete into a block is reported with the reason, never
guessed. Blocks chained through the residual stream form a stack; a graph with two stacks
(vision encoder, language model) also gets the connector between them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.projection import Projection, projection_at, projection_producing
from graphopt.ir.traversal import ancestors, descendants
from graphopt.ir.types import canonical_dim, dims_equal

# ops a value passes through without changing what it "is" (a token stream, a head layout)
TRANSPARENT = {"reshape", "permute", "cast", "slice", "select", "expand", "mul", "div", "add", "sub", "neg", "cat",
               "contiguous"}
NORM_OPS = {"layer_norm"}
RMS_NORM_OPS = {"mul", "rsqrt", "add", "mean", "pow", "cast", "sqrt", "div", "reciprocal"}
MAX_WALK = 24


class StructureError(Exception):
    """No transformer block could be recognised; the message says what was looked for and why it failed."""


@dataclass
class Norm:
    kind: str  # "layer_norm" or "rms_norm"
    nodes: list[Node]
    input: Value
    output: Value


@dataclass
class Attention:
    core: Node
    kind: str  # "sdpa" or "softmax"
    q: Projection
    k: Projection
    v: Projection
    out: Projection
    num_heads: int
    head_size: int
    num_kv_heads: int
    mask: Value | None
    causal: bool
    probs: Value | None = None  # the attention probabilities (softmax output), when explicit

    @property
    def fused_qkv(self) -> bool:
        return self.q.weight is self.k.weight

    @property
    def input(self) -> Value:
        return self.q.input


@dataclass
class MLP:
    fc1: Projection
    fc2: Projection
    activation: list[str]
    gate: Projection | None = None  # gated MLPs (SwiGLU): act(gate(x)) * fc1(x)
    convs: list[Node] = field(default_factory=list)  # convolutions between fc1 and fc2 (SegFormer's Mix-FFN)


@dataclass
class Block:
    index: int
    attention: Attention
    mlp: MLP
    norms: list[Norm]
    residual_adds: list[Node]
    input: Value
    output: Value
    norm_position: str  # "pre" or "post"
    token_axis: int
    module: str = ""
    layer_scales: list[Node] = field(default_factory=list)  # LayerScale muls before the residual adds
    grid: list[str] = field(default_factory=list)  # why the block needs the fixed token grid (windows, convs)

    @property
    def hidden_size(self) -> int:
        return self.attention.q.in_features


@dataclass
class Structure:
    blocks: list[Block]
    stacks: list[list[Block]]
    special_tokens: dict[int, list[int]] = field(default_factory=dict)  # stack index -> token positions
    connector: list[Projection] = field(default_factory=list)
    connector_input: Value | None = None
    connector_output: Value | None = None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        for s, stack in enumerate(self.stacks):
            b0 = stack[0]
            lines.append(f"stack {s}: {len(stack)} blocks, hidden {b0.hidden_size}, heads {b0.attention.num_heads}x"
                         f"{b0.attention.head_size}, {b0.norm_position}-norm"
                         f"{', LayerScale' if b0.layer_scales else ''}, token axis {b0.token_axis}, "
                         f"special tokens {self.special_tokens.get(s, [])}"
                         + (f"; needs the token grid: {'; '.join(b0.grid)}" if b0.grid else ""))
        if self.connector:
            lines.append("connector: " + " -> ".join(p.name for p in self.connector))
        lines += [f"unrecognised: {p}" for p in self.problems]
        return "\n".join(lines)


def analyze(graph: Graph, strict: bool = False) -> Structure:
    """Find the transformer blocks. Raises StructureError when there are none (or, with
    ``strict``, when any attention core could not be completed into a block)."""
    cores = [n for n in graph.nodes if n.op == "sdpa" or (n.op == "softmax" and _softmax_core(n) is not None)]
    if not cores:
        raise StructureError("no attention found: the graph has no sdpa node and no softmax between two "
                             "matmuls, so it has no recognisable transformer blocks")
    blocks, problems = [], []
    for core in cores:
        try:
            blocks.append(_block(core))
        except _NotABlock as e:
            problems.append(f"attention at {core.label()} in module {core.meta.get('module', '?')!r}: {e}")
    if not blocks:
        raise StructureError("found attention but no complete transformer block:\n  " + "\n  ".join(problems))
    if strict and problems:
        raise StructureError("some attention cores are not complete blocks:\n  " + "\n  ".join(problems))
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    blocks.sort(key=lambda b: order[id(b.attention.core)])
    for i, b in enumerate(blocks):
        b.index = i
    structure = Structure(blocks, _stacks(blocks), problems=problems)
    for s, stack in enumerate(structure.stacks):
        structure.special_tokens[s] = _special_tokens(stack[0])
    if len(structure.stacks) >= 2:
        _connector(structure)
    return structure


class _NotABlock(Exception):
    pass


# ---- building blocks ------------------------------------------------------------------------
def norm_at(value: Value) -> Norm | None:
    """A norm producing ``value``: layer_norm, or an RMSNorm written out (x * rsqrt(mean(x²) + eps) * w)."""
    node = value.producer
    while node is not None and node.op in ("cast", "reshape"):
        node = node.inputs[0].producer
    if node is None:
        return None
    if node.op in NORM_OPS:
        return Norm("layer_norm", [node], node.inputs[0], node.output)
    if node.op == "mul":
        nodes = [node] + [n for n in ancestors(node, through=lambda n: n.op in RMS_NORM_OPS, depth=8)
                          if n.op in RMS_NORM_OPS and n is not node]
        powers = [n for n in nodes if n.op == "pow"]
        if powers and any(n.op in ("rsqrt", "sqrt") for n in nodes) and any(n.op == "mean" for n in nodes):
            source = powers[-1].inputs[0]
            while source.producer is not None and source.producer.op == "cast":
                source = source.producer.inputs[0]
            return Norm("rms_norm", nodes, source, value)
    return None


def _norm_below(value: Value) -> Norm:
    """The norm that reads ``value``: a layer_norm, or the weight multiply that ends an RMSNorm."""
    def accept(user, _):
        if user.op in NORM_OPS:
            return norm_at(user.output)
        if user.op == "mul" and any(i.is_constant and i.type.rank == 1 for i in user.inputs):
            found = norm_at(user.output)
            return found if found is not None and _same_stream(found.input, value) else None
        return None
    return _walk_down(value, accept, "MLP norm",
                      through={"cast", "mul", "pow", "mean", "add", "rsqrt", "sqrt", "reciprocal", "token_merge"})


def _softmax_core(node: Node):
    """(scores matmul, output matmul) around a softmax, else None. Exporters may guard the
    probabilities (``where(isnan(p), 0, p)``) or cast them on the way to the second matmul."""
    probabilities = {id(node.output)}

    def guard(user: Node) -> bool:
        if user.op in ("where", "cast") and any(id(v) in probabilities for v in user.inputs[1:]):
            probabilities.update(id(v) for v in user.outputs)
            return True
        return False
    out_users = [u for u in descendants(node, through=guard, depth=3)
                 if u.op == "matmul" and id(u.inputs[0]) in probabilities]
    if len(out_users) != 1:
        return None
    scores = node.inputs[0]
    for _ in range(6):
        p = scores.producer
        if p is None:
            return None
        if p.op == "matmul":
            return p, out_users[0]
        if p.op not in ("mul", "div", "add", "where", "cast", "sub"):
            return None
        scores = p.inputs[1] if p.op == "where" else p.inputs[0]
    return None


def _walk_up_to_projection(value: Value, what: str) -> Projection:
    """The one projection that ``value`` is computed from through transparent ops."""
    found: dict[int, Projection] = {}

    def onward(node: Node) -> bool:
        proj = next(filter(None, (projection_producing(v) for v in node.outputs)), None)
        if proj is not None:
            found[id(proj.weight)] = proj
            return False
        return node.op in TRANSPARENT or node.op == "opaque"
    for _ in ancestors(value, through=onward, limit=MAX_WALK):
        pass
    if len(found) != 1:
        raise _NotABlock(f"{what}: expected one projection feeding %{value.name}, found "
                         f"{len(found)} ({', '.join(p.name for p in found.values()) or 'none'})")
    return next(iter(found.values()))


def _walk_down(value: Value, accept, what: str, through=TRANSPARENT):
    """The first node below ``value`` (through ``through`` ops) that ``accept(node, the value it was
    reached by)`` returns truthy for."""
    reached = {id(value)}

    def onward(user: Node) -> bool:
        if through(user) if callable(through) else user.op in through:
            reached.update(id(v) for v in user.outputs)
            return True
        return False
    for user in descendants(value, through=onward, limit=MAX_WALK):
        hit = accept(user, next(v for v in user.inputs if v is not None and id(v) in reached))
        if hit:
            return hit
    raise _NotABlock(f"{what}: nothing suitable below %{value.name}")


def _block(core: Node) -> Block:
    if core.op == "sdpa":
        q_in, k_in, v_in = core.inputs[:3]
        mask = core.inputs[3] if len(core.inputs) > 3 else None
        causal = bool(core.attrs["is_causal"])
        out_value, probs = core.output, None
    else:
        scores_mm, out_mm = _softmax_core(core)
        q_in, k_in, v_in = scores_mm.inputs[0], scores_mm.inputs[1], out_mm.inputs[1]
        mask, causal = _explicit_mask(core.inputs[0], scores_mm)
        out_value, probs = out_mm.output, core.output
    if core.op == "sdpa" and mask is not None:
        causal = causal or _is_causal_mask(mask)
    q = _walk_up_to_projection(q_in, "query")
    k = _walk_up_to_projection(k_in, "key")
    v = _walk_up_to_projection(v_in, "value")
    head_size = int(q_in.type.shape[-1])
    heads = int(q_in.type.shape[-3]) if q_in.type.rank >= 4 else 1
    kv_heads = int(k_in.type.shape[-3]) if k_in.type.rank >= 4 else heads
    if core.op == "softmax":
        kv_heads = int(v_in.type.shape[-3]) if v_in.type.rank >= 4 else heads

    def is_out_projection(user, _):
        proj = projection_at(user)
        return proj if proj is not None and proj.input is user.inputs[0] else None

    out = _walk_down(out_value, is_out_projection, "output projection", through={"reshape", "permute", "cast"})
    stream_in, partition = _window_partition(q.input)
    norms: list[Norm] = []
    pre = norm_at(stream_in)

    def is_residual_add(user, via):
        if user.op != "add":
            return None
        other = user.inputs[1] if user.inputs[0] is via else user.inputs[0]
        return (user, other) if not other.is_constant else None

    layer_scales: list[Node] = []
    residual_path = _residual_path(layer_scales)
    attn_add, residual = _walk_down(out.output, is_residual_add, "attention residual add", through=residual_path)
    if pre is not None and (pre.input is residual or _same_stream(pre.input, residual)):
        position = "pre"
        norms.append(pre)
        mlp_in_norm = _norm_below(attn_add.output)
        norms.append(mlp_in_norm)
        mlp_in, mlp_residual_source = mlp_in_norm.output, attn_add.output
    elif _same_stream(stream_in, residual):
        position = "post"
        ln1 = _walk_down(attn_add.output, lambda u, v: norm_at(u.output) if u.op in NORM_OPS else None, "post-attention norm")
        norms.append(ln1)
        mlp_in, mlp_residual_source = ln1.output, ln1.output
    else:
        raise _NotABlock(f"the residual add {attn_add.label()} does not add the attention input's stream")
    mlp = _mlp(mlp_in)
    mlp_add, other = _walk_down(mlp.fc2.output, is_residual_add, "MLP residual add", through=residual_path)
    if not _same_stream(other, mlp_residual_source):
        raise _NotABlock(f"the MLP residual add {mlp_add.label()} does not add the stream after attention")
    output = mlp_add.output
    if position == "post":
        ln2 = _walk_down(mlp_add.output, lambda u, v: norm_at(u.output) if u.op in NORM_OPS else None, "post-MLP norm")
        norms.append(ln2)
        output = ln2.output
    block_input = residual if position == "pre" else stream_in
    grid = _grid_dependence(q, k, mlp, partition, mask, block_input)
    if partition and block_input.type.rank != 3:
        raise _NotABlock(f"windowed attention on a stream {block_input.type} that is not [batch, tokens, hidden]")
    axis = 1 if partition else _token_axis(q_in, q, block_input)
    attention = Attention(core, core.op, q, k, v, out, heads, head_size, kv_heads, mask, causal, probs)
    return Block(0, attention, mlp, norms, [attn_add, mlp_add], block_input, output, position, axis,
                 core.meta.get("module", ""), layer_scales, grid)


WINDOW_OPAQUE = ("aten::roll", "aten::pad", "aten::constant_pad_nd")


def _window_partition(value: Value) -> tuple[Value, list[Node]]:
    """(the stream, the layout nodes) when ``value`` is the stream re-laid into windows (Swin:
    reshape / pad / roll / permute to [windows x batch, window tokens, hidden]); (value, []) when
    attention reads the stream itself."""
    nodes, v = [], value
    while v.producer is not None and len(nodes) < MAX_WALK:
        p = v.producer
        if not (p.op in ("reshape", "permute", "cast", "slice")
                or (p.op == "opaque" and p.attrs["target"].startswith(WINDOW_OPAQUE))):
            break
        nodes.append(p)
        v = p.inputs[0]
    windowed = any(n.op in ("permute", "opaque") for n in nodes)  # a window partition always permutes
    return (v, nodes) if windowed and norm_at(v) is not None else (value, [])


def _grid_dependence(q: Projection, k: Projection, mlp: MLP, partition: list[Node], mask, stream: Value) -> list[str]:
    """Why the block needs its tokens on the fixed image grid (empty when it does not)."""
    reasons = []
    if partition:
        windows = canonical_dim(sympy.sympify(q.input.type.shape[0]) / sympy.sympify(stream.type.shape[0]))
        shifted = any(n.op == "opaque" and n.attrs["target"].startswith("aten::roll") for n in partition)
        reasons.append(f"windowed attention (Swin): the {stream.type.shape[1]} tokens of the stream are re-laid into "
                       f"{windows} window{'' if windows == 1 else 's'} of {q.input.type.shape[1]} tokens"
                       + (", shifted by a roll" if shifted else "")
                       + (" with a relative position bias" if mask is not None and not mask.is_constant else ""))
    if k.input is not q.input:
        convs = [n for n in _ancestors(k.input, q.input) if n.op == "conv2d"]
        if convs:
            reasons.append(f"spatial-reduction attention (SegFormer): keys and values come from a conv2d with stride "
                           f"{list(convs[0].attrs['stride'])} over the token grid ({_conv_name(convs[0])})")
    for conv in mlp.convs:
        reasons.append(f"a conv2d over the token grid inside the MLP (Mix-FFN, groups {conv.attrs['groups']}: "
                       f"{_conv_name(conv)})")
    return reasons


def _conv_name(conv: Node) -> str:
    return f"{conv.label()} in module {conv.meta.get('module', '?')!r}"


def _ancestors(value: Value, stop: Value) -> list[Node]:
    """The nodes between ``stop`` and ``value`` (``value``'s producers up to ``stop``)."""
    return [n for n in ancestors(value, through=lambda n: stop not in n.outputs, limit=64) if stop not in n.outputs]


def _residual_path(found: list[Node]):
    """Ops between a branch's last projection and its residual add: layout ops (with Swin's
    window reverse: permutes, rolls, un-padding slices) and a
    LayerScale (DINOv2, BEiT, Data2Vec-vision: a mul by a per-channel constant), collected in ``found``."""
    def passes(node: Node) -> bool:
        if node.op in ("reshape", "cast", "permute", "slice") \
                or (node.op == "opaque" and node.attrs["target"].startswith(WINDOW_OPAQUE)):
            return True
        if node.op == "mul" and _is_per_channel_scale(node):
            found.append(node)
            return True
        return False
    return passes


def _is_per_channel_scale(node: Node) -> bool:
    consts = [v for v in node.inputs if v.is_constant]
    if len(consts) != 1:
        return False
    scale, x = consts[0].type, node.output.type
    return scale.rank >= 1 and dims_equal(scale.shape[-1], x.shape[-1]) and all(dims_equal(d, 1) for d in scale.shape[:-1])


def _token_axis(q_in: Value, q: Projection, stream: Value) -> int:
    """The stream's token axis: the query rows (axis -2 of the attention's q) followed up through
    the layout ops to the query projection's input, by position; a head size equal to the token
    count cannot be mistaken for it. When the walk cannot follow an op, the one stream axis of the
    attention length (an error when there are several)."""
    axis = _axis_above(q_in, q_in.type.rank - 2, q.output, MAX_WALK, set())
    if axis is not None and axis < q.input.type.rank - 1 and q.input.type.rank == stream.type.rank:
        return axis
    seq = q_in.type.shape[-2]
    axes = [i for i, d in enumerate(stream.type.shape) if i > 0 and dims_equal(d, seq)]
    if len(axes) != 1:
        raise _NotABlock(f"no token axis: the query rows could not be followed up to %{q.output.name}, and the stream "
                         f"{stream.type} has {len(axes)} axes of the attention length {seq}")
    return axes[0]


def _axis_above(value: Value, axis: int, target: Value, budget: int, seen: set) -> int | None:
    """Axis ``axis`` of ``value`` as an axis of ``target`` (an ancestor), through permute, reshape
    (one axis to one axis), slices and elementwise ops; None when the walk cannot follow it."""
    if value is target:
        return axis
    node = value.producer
    if node is None or budget <= 0 or node.op == "opaque" or (id(value), axis) in seen:
        return None
    seen.add((id(value), axis))
    if node.op == "permute":
        return _axis_above(node.inputs[0], node.attrs["dims"][axis] % value.type.rank, target, budget - 1, seen)
    if node.op == "reshape":
        src_shape = node.inputs[0].type.shape
        for src, dst in reshape_groups(src_shape, value.type.shape) or []:
            if axis in dst:
                wide_src = [a for a in src if not dims_equal(src_shape[a], 1)]
                wide_dst = [a for a in dst if not dims_equal(value.type.shape[a], 1)]
                if wide_dst == [axis] and len(wide_src) == 1:
                    return _axis_above(node.inputs[0], wide_src[0], target, budget - 1, seen)
        return None
    if node.op in TRANSPARENT:
        if node.op == "select" or (node.op == "cat" and node.attrs["dim"] % value.type.rank == axis):
            return None
        for v in node.inputs:
            if v is not None and not v.is_constant and v.type.rank == value.type.rank \
                    and dims_equal(v.type.shape[axis], value.type.shape[axis]):
                found = _axis_above(v, axis, target, budget - 1, seen)
                if found is not None:
                    return found
    return None


def _mlp(mlp_in: Value) -> MLP:
    layout = ("reshape", "cast")
    readers = [u for u in descendants(mlp_in, through=lambda u: u.op in layout) if u.op not in layout]
    acm = next((u for u in readers if u.op == "acm"), None)
    if acm is not None:  # an MLP the acm pass made conditional: one op stands for both projections
        whole = Projection([acm], mlp_in, acm.output, acm.inputs[4], acm.inputs[5], int(mlp_in.type.shape[-1]),
                           int(acm.output.type.shape[-1]))
        return MLP(whole, whole, [acm.attrs["activation"]])
    firsts = [p for p in (projection_at(u) for u in readers) if p is not None]
    if not firsts:
        raise _NotABlock(f"MLP: no projection reads the MLP input %{mlp_in.name}")
    activation: list[str] = []
    convs: list[Node] = []

    def is_fc2(user, _):
        proj = projection_at(user)
        if proj is not None and proj not in firsts and proj.input is user.inputs[0] \
                and not any(proj.weight is f.weight for f in firsts):
            return proj
        if user.op == "conv2d":
            convs.append(user)
        elif user.op not in ("matmul", "linear", "reshape", "cast", "permute"):
            activation.append(user.op)
        return None

    fc2 = _walk_down(firsts[0].output, is_fc2, "MLP second projection",
                     through={"gelu", "relu", "silu", "sigmoid", "tanh", "mul", "add", "pow", "erf", "div", "cast", "reshape",
                              "permute", "conv2d"})
    gate = None
    if len(firsts) == 2:  # gated MLP: one branch goes through the activation
        gate = next(p for p in firsts if any(u.op in ("silu", "gelu", "sigmoid") for u in p.output.users))
        fc1 = next(p for p in firsts if p is not gate)
    elif len(firsts) == 1:
        fc1 = firsts[0]
    else:
        raise _NotABlock(f"MLP: {len(firsts)} projections read %{mlp_in.name}; expected 1 or 2 (gated)")
    return MLP(fc1, fc2, list(dict.fromkeys(activation)), gate, convs)


def _same_stream(a: Value, b: Value) -> bool:
    """Equal, or equal up to reshape/cast (and token merging, which keeps the stream's meaning)."""
    def root(v):
        while v.producer is not None and v.producer.op in ("reshape", "cast", "token_merge"):
            v = v.producer.inputs[0]
        return v
    return root(a) is root(b)


def _explicit_mask(scores: Value, scores_mm: Node):
    mask, causal = None, False
    v = scores
    while v.producer is not None and v.producer is not scores_mm:
        node = v.producer
        if node.op == "where":
            mask = node.inputs[0]
            causal = causal or _is_causal_mask(mask)
            v = node.inputs[1]
        elif node.op == "add" and (not node.inputs[1].is_constant or node.inputs[1].type.rank >= 2):
            mask = node.inputs[1]
            causal = causal or _is_causal_mask(mask)
            v = node.inputs[0]
        else:
            v = node.inputs[0]
    return mask, causal


def _is_causal_mask(mask: Value) -> bool:
    """The mask compares two position ranges (an arange against an arange), or is a constant
    that blocks exactly the future positions (exporters fold static causal masks)."""
    if mask.is_constant:
        return _constant_causal(mask.const)
    return any(node.op in ("le", "ge", "lt", "gt") and all(_from_arange(i) for i in node.inputs)
               for node in ancestors(mask, limit=200))


def _constant_causal(tensor) -> bool:
    import torch
    if tensor.dim() < 2 or tensor.shape[-1] != tensor.shape[-2] or tensor.shape[-1] < 2:
        return False
    square = tensor.reshape(-1, tensor.shape[-2], tensor.shape[-1])[0]
    future = torch.ones_like(square, dtype=torch.bool).triu(1)
    blocked = ~square if square.dtype == torch.bool else square <= -1e4
    return bool((blocked == future).all())


def _from_arange(value: Value) -> bool:
    return any(node.op == "arange" for node in ancestors(value, limit=50))


def _stacks(blocks: list[Block]) -> list[list[Block]]:
    stacks: list[list[Block]] = []
    for b in blocks:
        if stacks and _same_stream(b.input, stacks[-1][-1].output):
            stacks[-1].append(b)
        else:
            stacks.append([b])
    return stacks


def _special_tokens(first: Block) -> list[int]:
    """Token positions that come from parameters (CLS, distillation) rather than the input:
    found at the ``cat`` along the token axis that builds the first block's input."""
    through = ("add", "cast", "reshape", "layer_norm", "opaque")
    for node in ancestors(first.input, through=lambda n: n.op in through, limit=64):
        if node.op == "cat" and node.attrs["dim"] % node.output.type.rank == first.token_axis:
            positions, offset = [], 0
            for piece in node.inputs:
                size = piece.type.shape[first.token_axis]
                if constant_derived(piece) and isinstance(size, int):
                    positions += list(range(offset, offset + size))
                if not isinstance(size, int):
                    break
                offset += size
            return positions
    return []


def constant_derived(value: Value) -> bool:
    """True when value is computed from constants only (no graph input reaches it)."""
    if value.producer is None:
        return value.is_constant
    return all(v.is_constant or v.producer is not None
               for node in ancestors(value) for v in node.inputs if v is not None)


def _connector(structure: Structure) -> None:
    """Projections on the way from the vision stack's features into the language stack."""
    vision, language = structure.stacks[0], structure.stacks[-1]
    target = language[0].input
    upstream = {id(target)} | {id(v) for node in ancestors(target) for v in node.inputs if v is not None}
    for block in reversed(vision):
        if id(block.output) not in upstream:
            continue
        def on_the_way(node: Node) -> bool:
            return any(id(o) in upstream for o in node.outputs)
        chain = [proj for node in descendants(block.output, through=on_the_way) if on_the_way(node)
                 for proj in [projection_at(node)] if proj is not None and proj.reader is node]
        structure.connector = chain
        structure.connector_input = block.output
        structure.connector_output = chain[-1].output if chain else None
        return


# ---- axes through layout ops ------------------------------------------------------------------
def reshape_groups(src, dst) -> list[tuple[list[int], list[int]]] | None:
    """The axes of a reshape from shape ``src`` to shape ``dst`` in consecutive groups of equal
    element count (``[B, N, C] -> [B, N, H, D]``: ``([0],[0]), ([1],[1]), ([2],[2,3])``), so an
    axis is followed by its position, never by its size. None when symbolic sizes leave it open."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) and j < len(dst):
        gi, gj = [i], [j]
        ps, pd = sympy.sympify(src[i]), sympy.sympify(dst[j])
        i, j = i + 1, j + 1
        while not dims_equal(ps, pd):
            bigger = _larger(ps, pd)
            if bigger is None:
                return None
            if bigger == "src" and j < len(dst):
                pd, gj = pd * sympy.sympify(dst[j]), gj + [j]
                j += 1
            elif bigger == "dst" and i < len(src):
                ps, gi = ps * sympy.sympify(src[i]), gi + [i]
                i += 1
            else:
                return None
        groups.append((gi, gj))
    rest_src, rest_dst = list(range(i, len(src))), list(range(j, len(dst)))
    if any(not dims_equal(src[a], 1) for a in rest_src) or any(not dims_equal(dst[a], 1) for a in rest_dst):
        return None
    if groups:
        groups[-1] = (groups[-1][0] + rest_src, groups[-1][1] + rest_dst)
    elif rest_src or rest_dst:
        groups.append((rest_src, rest_dst))
    return groups


def _larger(a, b) -> str | None:
    """Which of two element counts is the larger one ("src" for a), when that is certain."""
    ratio = sympy.simplify(a / b)
    if ratio.is_number:
        return "src" if ratio > 1 else "dst"
    num, den = sympy.fraction(sympy.factor(ratio))
    if den.is_number and den > 0 and num.free_symbols:
        return "src"
    if num.is_number and num > 0 and den.free_symbols:
        return "dst"
    return None
