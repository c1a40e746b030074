"""The conversion: each float node in order gets an integer form (a ``Q``), or stays in float
between an ``int.dequantize`` and an ``int.quantize`` with the reason recorded."""
from __future__ import annotations

import functools
import math
from collections import Counter

import torch

from graphopt.ir import Graph, Value
from graphopt.passes.calibration import Stats, clip_range
from graphopt.passes.integer_only import IntegerConversionError
from graphopt.passes.integer_only.dyadic import INT32_LIMIT, choose_dyadic
from graphopt.passes.integer_only.form import Q, is_float
from graphopt.passes.integer_only.tokens import CONVERTERS, add_log2_sizes, is_merge_metric, log_of_sizes

LAYOUT = {"reshape", "permute", "expand", "slice", "select", "index_select"}
MASK_NEGATIVE = 1e4  # an additive attention mask blocks with -inf or a value at least this negative
LOG2E = 1.0 / math.log(2.0)


class Converter:
    def __init__(self, graph: Graph, stats: dict[str, Stats], opts: dict):
        self.g = graph
        self.stats = stats
        self.o = opts
        self.q: dict[int, Q] = {}                # float value id -> its integer form
        self.cache: dict[tuple, Q] = {}          # (float value id, kind) -> converted form
        self.masked: dict[int, tuple[Q, Value | None, Q | None]] = {}  # softmax input -> (scores, keep, sizes)
        self.mask_bias: dict[int, Value] = {}    # additive mask value id -> its keep condition
        self.deq: dict[int, Value] = {}
        self.fallback: list[str] = []
        self.fallback_reasons: list[dict] = []   # {"node", "op", "reason"} per node left in float
        self.converted = 0
        self.converted_ops: Counter = Counter()
        self.all_true: set[int] = set()

    # ---- helpers -----------------------------------------------------------------------------
    def const(self, tensor: torch.Tensor, name: str) -> Value:
        return self.g.add_constant(tensor.contiguous(), name)

    def amax(self, v: Value, bits: int) -> float:
        if v.is_constant:
            a = v.const.abs().max().item() if v.const.numel() else 1.0
            return a if a > 0 else 1.0
        s = self.stats.get(v.name)
        if s is None or s.lo == float("inf"):
            raise IntegerConversionError(f"no calibration statistics for %{v.name}")
        method = self.o["method"] if bits <= 8 else "minmax"
        return clip_range(s, bits, method, self.o["percentile"])

    def scale_of(self, v: Value, bits: int) -> float:
        return self.amax(v, bits) / (2 ** (bits - 1) - 1)

    def kind_params(self, kind: str, bits: int | None = None):
        """(lo, hi, zp, dtype, bits) of a target representation."""
        if kind == "u8":
            b = self.o["act_bits"]
            return -2 ** (b - 1), 2 ** (b - 1) - 1, 128, "u8", b
        if kind == "i8":
            b = self.o["act_bits"]
            return -2 ** (b - 1), 2 ** (b - 1) - 1, 0, "i8", b
        b = bits or self.o["resid_bits"]
        return -2 ** (b - 1), 2 ** (b - 1) - 1, 0, "i32", b

    # ---- conversions between representations -----------------------------------------------
    def requant(self, src: Q, scale: float, lo: int, hi: int, zp: int, dtype: str, kind: str) -> Q:
        r = (src.scale / scale).double()
        cterm = (src.offset / scale).double() if src.offset is not None else torch.zeros(())
        K = -lo
        (pre,), k, (m,) = choose_dyadic([(r, src.bound)], cterm.abs().max().item() + (src.zp * r.abs().max().item()),
                                        K, max(-lo, hi), allow_pre=not src.zp)
        if src.zp and pre:
            raise IntegerConversionError("internal: pre-shift with a zero point")
        c = torch.round(cterm * 2.0 ** k).to(torch.int64) - src.zp * m + (2 ** (k - 1) if k else 0)
        m, c = torch.broadcast_tensors(m, c) if m.shape != c.shape else (m, c)
        out = self.g.op("int.requant", src.value, self.const(m.to(torch.int32), "rq_m"),
                        self.const(c.to(torch.int32), "rq_c"), pre=pre, k=k, lo=lo, hi=hi, zero_point=zp, dtype=dtype)
        return Q(out, torch.tensor(scale, dtype=torch.float64), None, zp, max(-lo, hi), kind)

    def to_kind(self, v: Value, kind: str, bits: int | None = None, scale: float | None = None) -> Q:
        """The integer form of float value ``v`` as ``kind`` (u8, i8 or i32 with ``bits``), converting
        (requant, or quantize at a graph edge / float island) where needed."""
        lo, hi, zp, dtype, b = self.kind_params(kind, bits)
        key = (id(v), kind, b, scale)
        if key in self.cache:
            return self.cache[key]
        base = self.q.get(id(v))
        if base is not None and base.kind == "prob" and kind == "u8":
            return base
        if base is not None and base.kind == kind and base.per_tensor and base.offset is None and \
                (kind != "i32" or base.bound <= 2 ** (b - 1)) and scale is None:
            return base
        target = scale if scale is not None else self.scale_of(v, b)
        if base is None:
            if v.is_constant:
                q = torch.clamp(torch.floor(v.const.double() / target + 0.5), lo, hi).to(torch.int64) + zp
                cv = self.const(q.to({"u8": torch.uint8, "i8": torch.int8, "i32": torch.int32}[dtype]), v.name + "_q")
                out = Q(cv, torch.tensor(target, dtype=torch.float64), None, zp, max(-lo, hi), kind)
            elif is_float(v):
                qv = self.g.op("int.quantize", v, inv_scale=float(1.0 / target), zero_point=zp, lo=lo, hi=hi, dtype=dtype)
                out = Q(qv, torch.tensor(target, dtype=torch.float64), None, zp, max(-lo, hi), kind)
            else:
                raise IntegerConversionError(f"%{v.name} is not a float value")
        else:
            out = self.requant(base, target, lo, hi, zp, dtype, kind)
        self.cache[key] = out
        return out

    def want(self, v: Value, depth: int = 0) -> str:
        """The representation v's consumers need: u8 for GEMM left operands, i8 for right ones, else i32."""
        kinds = set()
        for user, idx in v.uses:
            if user.op in LAYOUT and depth < 8:
                kinds.add(self.want(user.output, depth + 1))
            elif user.op in ("linear", "conv2d") and idx == 0:
                kinds.add("u8")
            elif user.op == "matmul":
                kinds.add("u8" if idx == 0 else "i8")
            elif is_merge_metric(user):     # token_merge's keys: the attention's i8 keys
                kinds.add("i8")
            else:
                kinds.add("i32")
        return kinds.pop() if len(kinds) == 1 else "i32"

    def float_of(self, v: Value) -> Value:
        """A float version of v for an op left in float (dequantized from its integer form)."""
        q = self.q.get(id(v))
        if q is None:
            return v
        if id(v) not in self.deq:
            scale = self.const(q.scale.float(), "dq_scale")
            offset = self.const(q.offset.float(), "dq_offset") if q.offset is not None else None
            self.deq[id(v)] = self.g.op("int.dequantize", q.value, scale, offset, zero_point=q.zp)
        return self.deq[id(v)]

    # ---- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.g.nodes):
            if not any(is_float(o) for o in node.outputs):
                if any(v is not None and (id(v) in self.q or id(v) in self.masked) for v in node.inputs):
                    self._fall_back(node, "non-float result from converted inputs")
                continue
            with self.g.inserting_before(node):
                try:
                    handler = getattr(self, "c_" + node.op.replace(".", "_"), None)
                    if handler is None and node.op in CONVERTERS:  # what token_merge inserted
                        handler = functools.partial(CONVERTERS[node.op], self)
                    ok = handler(node) if handler is not None else False
                except IntegerConversionError as e:  # name the node and the calibrated ranges it meets
                    raise IntegerConversionError(f"{node.label()}: {e}; {self._ranges(node)}") from None
            if ok:
                self.converted += 1
                self.converted_ops[node.op] += 1
                continue
            self._fall_back(node, "no integer form of this op" if handler is None
                            else "its integer form does not cover these operands or attributes")
        for i, v in enumerate(list(self.g.outputs)):
            if id(v) in self.q:
                with self.g.inserting_before(None):
                    self.g.outputs[i] = self.float_of(v)
        self.g.remove_dead()

    def _fall_back(self, node, reason: str) -> None:
        self.fallback.append(f"{node.op} ({node.label()})")
        self.fallback_reasons.append({"node": node.label(), "op": node.op, "reason": reason})
        with self.g.inserting_before(node):
            for i, v in enumerate(node.inputs):
                if v is not None and id(v) in self.q:
                    self.g.set_input(node, i, self.float_of(v))
                elif v is not None and id(v) in self.masked:
                    raise IntegerConversionError(f"{node.label()} uses a masked score tensor outside softmax")

    def _ranges(self, node) -> str:
        """The calibrated [min, max] of the node's float inputs, for error messages."""
        parts = []
        for v in node.inputs:
            s = self.stats.get(v.name) if v is not None and not v.is_constant else None
            if s is not None and s.lo != float("inf"):
                parts.append(f"%{v.name} in [{s.lo:.4g}, {s.hi:.4g}]")
        text = "calibrated inputs: " + (", ".join(parts) or "none")
        if any(s is not None and max(abs(s.lo), abs(s.hi)) > 1e30 for s in
               (self.stats.get(v.name) for v in node.inputs if v is not None)):
            text += (" (a value near float's limit, such as a finfo.min mask fill, reaches this op; integer_only "
                     "keeps out only plain additive masks, where(keep, 0, fill) + scores before softmax)")
        return text

    def has_q(self, v: Value | None) -> bool:
        return v is not None and (id(v) in self.q or v.is_constant)

    def set(self, node, q: Q) -> bool:
        self.q[id(node.output)] = q
        return True

    # ---- op converters -------------------------------------------------------------------------
    def _weights(self, w: torch.Tensor):
        wf = w.double()
        s = wf.reshape(wf.shape[0], -1).abs().amax(1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        wq = torch.clamp(torch.round(wf / s.reshape((-1,) + (1,) * (wf.dim() - 1))), -127, 127).to(torch.int8)
        return wq, s

    def _gemm(self, node, x: Value, w: Value, b: Value | None, conv: bool) -> bool:
        if not w.is_constant or (b is not None and not b.is_constant) or not is_float(x):
            return False
        smooth = self.smoothing(x) if not conv else None
        if smooth is not None:
            xq, s = smooth
            wq, sw = self._weights(w.const.double() * s)
        else:
            xq = self.to_kind(x, "u8")
            wq, sw = self._weights(w.const)
        sacc = xq.scale * sw
        bq = None
        if b is not None:
            bi = torch.round(b.const.double() / sacc)
            if bi.abs().max().item() >= 2 ** 30:
                return False
            bq = bi.to(torch.int32)
        wabs = wq.to(torch.int64).abs().reshape(wq.shape[0], -1).sum(1)
        bound = int((wabs * xq.bound).max().item() + (bq.abs().max().item() if bq is not None else 0))
        if bound >= 2 ** 31:
            return False
        wv = self.const(wq, w.name + "_i8")
        bv = self.const(bq, (b.name if b is not None else "bias") + "_i32") if bq is not None else None
        if conv:
            out = self.g.op("int.conv2d", xq.value, wv, bv, stride=node.attrs["stride"], x_zp=xq.zp)
            scale = sacc.reshape(-1, 1, 1)
        else:
            out = self.g.op("int.linear", xq.value, wv, bv, x_zp=xq.zp)
            scale = sacc
        return self.set(node, Q(out, scale, None, 0, bound, "acc"))

    def smoothing(self, x: Value):
        """SmoothQuant on the integer side: the GEMM reads x / s (per input channel, folded into the
        requant that produces its u8 input) and uses W * s, with
        s_j = max|x_j|^alpha / max|W_:j|^(1-alpha) over every linear reading x. Other readers of x
        (a residual add) keep the unsmoothed x. Returns (u8 Q of x / s, s) or None."""
        alpha = self.o.get("smoothquant", 0.0)
        q = self.q.get(id(x))
        st = self.stats.get(x.name)
        if alpha <= 0 or q is None or st is None or st.channel_absmax is None or x.type.rank < 1 or \
                st.channel_absmax.numel() != x.type.shape[-1]:
            return None
        if ("smooth", id(x)) in self.cache:
            return self.cache[("smooth", id(x))]
        users = [u for u in x.users if u.op == "linear" and u.inputs[0] is x and u.inputs[1].is_constant]
        wmax = torch.stack([u.inputs[1].const.double().abs().amax(0) for u in users]).amax(0)
        act = st.channel_absmax.double()
        s = (act.clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        src = Q(q.value, q.scale / s, q.offset / s if q.offset is not None else None, q.zp, q.bound, q.kind)
        lo, hi, zp, dtype, bits = self.kind_params("u8")
        target = (act / s).max().item() / hi
        out = (self.requant(src, target, lo, hi, zp, dtype, "u8"), s)
        self.cache[("smooth", id(x))] = out
        return out

    def c_linear(self, node) -> bool:
        return self._gemm(node, node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None, False)

    def c_conv2d(self, node) -> bool:
        a = node.attrs
        if tuple(a["padding"]) != (0, 0) or tuple(a["dilation"]) != (1, 1) or a["groups"] != 1:
            return False
        return self._gemm(node, node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None, True)

    def c_matmul(self, node) -> bool:
        a, b = node.inputs
        if a.is_constant or b.is_constant or not (self.has_q(a) or is_float(a)):
            return False
        k = a.type.shape[-1]
        if not isinstance(k, int):
            return False
        aq = self.to_kind(a, "u8")
        bq = self.to_kind(b, "i8")
        out = self.g.op("int.matmul", aq.value, bq.value, a_zp=aq.zp, b_zp=bq.zp)
        return self.set(node, Q(out, aq.scale * bq.scale, None, 0, k * aq.bound * bq.bound, "acc"))

    def _scalar(self, v: Value) -> float | None:
        if v is not None and v.is_constant and v.const.numel() == 1 and v.const.dtype.is_floating_point:
            return float(v.const.item())
        return None

    def _channel_factors(self, x: Value, c: Value) -> torch.Tensor | None:
        """c's values [C] when c is a finite float constant along x's last axis only, and x's integer form has one
        scale per tensor or per last-axis channel (the requants' per-column multipliers), else None."""
        q = self.q.get(id(x))
        if q is None or not c.is_constant or not c.const.dtype.is_floating_point or not x.type.shape or \
                c.const.dim() == 0 or c.const.dim() > x.type.rank or c.const.shape[-1] != x.type.shape[-1] or \
                any(d != 1 for d in c.const.shape[:-1]) or any(d != 1 for d in q.scale.shape[:-1]):
            return None
        g = c.const.double().reshape(-1)
        return g if bool(torch.isfinite(g).all()) else None

    def c_mul(self, node) -> bool:
        a, b = node.inputs
        for x, c in ((a, b), (b, a)):
            s = self._scalar(c)
            # a positive scalar, or (LayerScale: DINOv2, CaiT) one factor per channel, goes into x's scale
            f = s if s is not None and s > 0 and id(x) in self.q else self._channel_factors(x, c)
            if f is not None:
                q = self.q[id(x)]
                return self.set(node, Q(q.value, q.scale * f, q.offset * f if q.offset is not None else None,
                                        q.zp, q.bound, q.kind))
        return False

    def c_div(self, node) -> bool:
        a, b = node.inputs
        s = self._scalar(b)
        if s is None or s <= 0 or id(a) not in self.q or node.attrs["rounding_mode"] != "none":
            return False
        q = self.q[id(a)]
        return self.set(node, Q(q.value, q.scale / s, q.offset / s if q.offset is not None else None, q.zp, q.bound, q.kind))

    def c_where(self, node) -> bool:
        cond, x, y = node.inputs
        if self._additive_mask(node):
            return True
        fill = self._scalar(y)
        if fill is None or fill != float("-inf") or id(x) not in self.q:
            return False
        if not all(u.op == "softmax" for u in node.output.users):
            return False
        self.masked[id(node.output)] = (self.q[id(x)], cond, None)
        return True

    def _additive_mask(self, node) -> bool:
        """The exporters' attention mask: ``where(keep, 0, NEG)`` (NEG = -inf or a huge negative such as
        finfo.min) added to the scores before softmax. Its range would swamp any integer scale; it is
        kept out of the integer range as Shiftmax's mask instead (``scores + mask`` is ``where(keep,
        scores, NEG)``), as for the torch capture's ``where(mask, scores, -inf)``."""
        cond, x, y = node.inputs
        zero, fill = self._scalar(x), self._scalar(y)
        if cond.type.dtype != torch.bool or zero != 0.0 or fill is None or fill > -MASK_NEGATIVE:
            return False
        for add in node.output.users:
            if add.op != "add" or any(u.op != "softmax" for u in add.output.users) or add.inputs[0] is add.inputs[1]:
                return False
        self.mask_bias[id(node.output)] = cond
        return True

    def c_softmax(self, node) -> bool:
        x = node.inputs[0]
        if node.attrs["dim"] not in (-1, x.type.rank - 1):
            return False
        mask = sizes = None
        if id(x) in self.masked:
            base, mask, sizes = self.masked[id(x)]
        elif id(x) in self.q or is_float(x):
            base = None
        else:
            return False
        T = x.type.shape[-1] if isinstance(x.type.shape[-1], int) else self.o["max_tokens"]
        n, bits = 14, self.o["attn_bits"]
        X = min(128, INT32_LIMIT // (T * 2 ** (n + 1)), 2 ** 30 // 2 ** (n + 1 + bits))
        if X < 8:
            return False
        lo, hi = -2 ** 15, 2 ** 15 - 1
        scale = 1.0 / (X * LOG2E)
        if base is None:
            xin = self.to_kind(x, "i32", bits=16, scale=scale)
        else:
            xin = self.requant(base, scale, lo, hi, 0, "i32", "i32")
        if mask is not None and id(mask) in self.all_true:
            mask = None
        x_int = xin.value if sizes is None else add_log2_sizes(self.g, xin.value, sizes.value, sizes.bound, X)
        out = self.g.op("int.shiftmax", x_int, mask, X=X, n=n, bits=bits)
        return self.set(node, Q(out, torch.tensor(2.0 ** -bits, dtype=torch.float64), None, 0, 2 ** bits, "prob"))

    def c_gelu(self, node) -> bool:
        x = node.inputs[0]
        X, n, bits = 128, 10, 12
        s_in = 1.0 / (1.702 * LOG2E * X)
        xin = self.to_kind(x, "i32", bits=16, scale=s_in)
        out = self.g.op("int.shiftgelu", xin.value, X=X, n=n, bits=bits, in_bits=16)
        return self.set(node, Q(out, torch.tensor(s_in * 2.0 ** -bits, dtype=torch.float64), None, 0, 2 ** (15 + bits), "acc"))

    def c_layer_norm(self, node) -> bool:
        x = node.inputs[0]
        shape = node.attrs["normalized_shape"]
        if len(shape) != 1 or not isinstance(shape[0], int):
            return False
        C = shape[0]
        w = node.inputs[1] if len(node.inputs) > 1 else None
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if (w is not None and not w.is_constant) or (b is not None and not b.is_constant):
            return False
        xq = self.to_kind(x, "i32")
        yb = 2 * xq.bound + 1
        sh = 0
        while C * (-(-yb // 2 ** sh) + 1) ** 2 >= 2 ** 31:
            sh += 1
        F = min(14, 30 - yb.bit_length())
        out = self.g.op("int.layernorm", xq.value, C=C, sh=sh, F=F, iters=20)
        gamma = w.const.double() if w is not None else torch.ones(C, dtype=torch.float64)
        beta = b.const.double() if b is not None else None
        scale = gamma * math.sqrt(C) / 2 ** F
        return self.set(node, Q(out, scale, beta, 0, 2 ** (F + 1), "acc"))

    def c_add(self, node) -> bool:
        a, b = node.inputs
        if not (is_float(a) and is_float(b)) or a.type.dtype != b.type.dtype:
            return False
        for x, c in ((a, b), (b, a)):  # x + 0: the exact exporter's all-zero attention mask, gone
            if c.is_constant and not bool(c.const.any()) and id(x) in self.q and x.type.matches(node.output.type):
                return self.set(node, self.q[id(x)])
        for scores, bias in ((a, b), (b, a)):  # scores + log(sizes): proportional attention, as Shiftmax's term
            sizes = log_of_sizes(self, bias)
            if sizes is not None and id(scores) in self.q and all(u.op == "softmax" for u in node.output.users):
                self.masked[id(node.output)] = (self.q[id(scores)], None, sizes)
                return True
        for scores, mask in ((a, b), (b, a)):
            if id(mask) in self.mask_bias:  # scores + additive mask: a masked softmax input
                if id(scores) not in self.q:
                    return False
                self.masked[id(node.output)] = (self.q[id(scores)], self.mask_bias[id(mask)], None)
                return True
        if not (id(a) in self.q or id(b) in self.q):
            return False
        branches = []
        for v in (a, b):
            q = self.q.get(id(v))
            if q is None or q.kind in ("u8", "i8", "prob"):
                q = self.to_kind(v, "i32")
            branches.append(q)
        lo, hi, _, _, bits = self.kind_params("i32")
        s_out = self.scale_of(node.output, bits)
        rs = [q.scale / s_out for q in branches]
        cterm = sum(((q.offset / s_out) if q.offset is not None else torch.zeros(())) for q in branches)
        pres, k, ms = choose_dyadic([(r, q.bound) for r, q in zip(rs, branches)], torch.as_tensor(cterm).abs().max().item(),
                                    -lo, max(-lo, hi))
        c = torch.round(torch.as_tensor(cterm, dtype=torch.float64) * 2.0 ** k).to(torch.int64) + (2 ** (k - 1) if k else 0)
        out = self.g.op("int.add", branches[0].value, branches[1].value,
                        self.const(ms[0].to(torch.int32), "add_ma"), self.const(ms[1].to(torch.int32), "add_mb"),
                        self.const(c.to(torch.int32), "add_c"), pa=pres[0], pb=pres[1], k=k, lo=lo, hi=hi)
        return self.set(node, Q(out, torch.tensor(s_out, dtype=torch.float64), None, 0, max(-lo, hi), "i32"))

    def c_embedding(self, node) -> bool:
        w, idx = node.inputs
        if not w.is_constant:
            return False
        lo, hi, _, _, bits = self.kind_params("i32")
        s = w.const.abs().max().item() / hi or 1.0
        wq = torch.clamp(torch.floor(w.const.double() / s + 0.5), lo, hi).to(torch.int32)
        out = self.g.op("embedding", self.const(wq, w.name + "_i32"), idx)
        return self.set(node, Q(out, torch.tensor(s, dtype=torch.float64), None, 0, max(-lo, hi), "i32"))

    def _layout(self, node) -> bool:
        x = node.inputs[0]
        if not (id(x) in self.q or x.is_constant):
            return False
        q = self.q.get(id(x))
        if q is None or not q.per_tensor or q.kind == "acc" or q.offset is not None:
            kind = self.want(node.output)
            lo, hi, zp, dtype, b = self.kind_params(kind)
            # calibrate on what the layout op keeps (a select keeps one token's statistics)
            q = self.to_kind(x, kind, scale=self.scale_of(node.output, b) if not x.is_constant else None)
        out = self.g.create_node(node.op, [q.value] + list(node.inputs[1:]), dict(node.attrs)).output
        return self.set(node, Q(out, q.scale, None, q.zp, q.bound, q.kind))

    c_reshape = c_permute = c_expand = c_slice = c_select = c_index_select = _layout  # index_select: ONNX Gather

    def c_opaque(self, node) -> bool:
        """aten::unbind (q, k, v = qkv.unbind(0)) becomes one select per output."""
        if node.attrs["target"] != "aten::unbind.int" or id(node.inputs[0]) not in self.q:
            return False
        args, kwargs = node.attrs["args"], node.attrs["kwargs"] or {}
        dim = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("dim", 0)
        x = node.inputs[0]
        q = self.q[id(x)]
        if not q.per_tensor or q.kind == "acc" or q.offset is not None:
            q = self.to_kind(x, "i32")
        for i, out in enumerate(node.outputs):
            v = self.g.op("select", q.value, dim=dim, index=i)
            self.q[id(out)] = Q(v, q.scale, None, q.zp, q.bound, q.kind)
        return True

    def c_cat(self, node) -> bool:
        xs = node.inputs
        if not any(id(v) in self.q for v in xs):
            return False
        lo, hi, _, _, bits = self.kind_params("i32")
        s = self.scale_of(node.output, bits)
        parts = [self.to_kind(v, "i32", scale=s).value for v in xs]
        out = self.g.op("cat", *parts, dim=node.attrs["dim"])
        return self.set(node, Q(out, torch.tensor(s, dtype=torch.float64), None, 0, max(-lo, hi), "i32"))

