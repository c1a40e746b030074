"""Replays a ``cpu_integer`` forward as its recorded kernel calls, without the Python between them.

The fx graph, the op wrappers and their allocations cost ~20 us a node: 4-6 ms of a DeiT-S forward, a fifth
of it at batch 1 (ONNX Runtime runs the same kernels from a prebuilt plan). So the second call with the same
input shapes, dtypes and strides runs under capture, which records in order:

    every C kernel call (``c_build.capture``: the function, its arguments, what it returned)
    every torch op that computes (``TorchDispatchMode``; views and allocations are not steps)
    every allocation (the storages the forward creates) and the steps that touch it

The plan then lays the allocations out in one arena by lifetime (first to last step that touches one; two share
bytes only when their lifetimes are disjoint, like ONNX Runtime's memory planner) and rewrites the kernels'
pointers (arguments and the pointer fields of their epilogue / Shiftmax records) and the torch ops' tensors
into it. Later calls with those shapes copy the inputs into the plan's slots, run the steps, and return copies
of the outputs; a kernel that returns something other than what it returned under capture (a status) ends the
replay and the call runs on the fx graph. Where the kernel library has ``go_run_calls`` (x86-64 Linux), each run
of kernel calls between torch steps is one ctypes call that makes them from C: DeiT-S 4 % faster at batch 1.

A forward whose Python reads tensor values (``item``, ``tolist``, ``numpy``), points a kernel at memory the
plan would not own, or returns a tensor it did not compute is not replayed (``Replay.refused`` says why).
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import threading
from collections import OrderedDict

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from graphopt.backends import c_build
from graphopt.backends.cpu_integer_library import Call, Softmax, library

aten = torch.ops.aten
ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
               aten.new_empty_strided.default, aten.empty_like.default}
READBACKS = {aten.resolve_conj.default, aten.resolve_neg.default}    # what tolist() and numpy() dispatch
BYREF = type(ctypes.byref(ctypes.c_int()))                             # a record passed by reference
ALIGN = 64
PLANS = 4                     # input signatures replayed per executable (each holds its arena)
WORD = (1 << 64) - 1


class NotReplayable(Exception):
    """The forward cannot be replayed from a recording; the message says which op or kernel and why."""


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class _Buffer:
    """A storage the captured forward allocated: where it was, the steps that touch it, where it goes."""
    __slots__ = ("start", "nbytes", "first", "last", "offset", "storage")

    def __init__(self, storage, step: int):
        self.storage, self.start, self.nbytes = storage, storage.data_ptr(), storage.nbytes()
        self.first = self.last = step
        self.offset = 0


class _Capture(TorchDispatchMode):
    """Records one forward: torch ops through the dispatcher, kernel calls through ``c_build.capture``."""

    def __init__(self, owned: list[torch.Tensor]):
        super().__init__()
        self.steps: list[tuple] = []
        self.buffers: dict[int, _Buffer] = {}
        self.starts: list[int] = []            # sorted buffer starts, for address lookups
        self.owned = {}                        # storage start -> (nbytes, storage): inputs, constants, literals
        self.owned_starts: list[int] = []
        for t in owned:
            self._own(t)

    def _own(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in self.owned:
            self.owned[s.data_ptr()] = (s.nbytes(), s)
            bisect.insort(self.owned_starts, s.data_ptr())

    def buffer_at(self, address: int) -> _Buffer | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            b = self.buffers[self.starts[i]]
            if address < b.start + b.nbytes:
                return b
        return None

    def _known(self, address: int, where: str) -> _Buffer | None:
        """The buffer holding ``address``, None for memory that stays put; raises for memory nobody keeps."""
        b = self.buffer_at(address)
        i = bisect.bisect_right(self.owned_starts, address) - 1
        if b is not None or (i >= 0 and address < self.owned_starts[i] + self.owned[self.owned_starts[i]][0]):
            return b
        raise NotReplayable(f"{where} reads memory at {address:#x} that neither the forward allocated nor the "
                            "executable holds")

    def touch(self, address: int, where: str) -> None:
        if address:
            b = self._known(address, where)
            if b is not None:
                b.last = len(self.steps)

    def _new_buffer(self, t: torch.Tensor) -> None:
        b = _Buffer(t.untyped_storage(), len(self.steps))
        self.buffers[b.start] = b
        bisect.insort(self.starts, b.start)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in READBACKS or func in (aten.item.default, aten._local_scalar_dense.default):
            raise NotReplayable(f"{func} reads a tensor's values into Python: the replay could not follow them")
        results = pytree.tree_leaves(out)
        if any(not isinstance(r, torch.Tensor) and r is not None for r in results):
            raise NotReplayable(f"{func} returns a Python value computed from tensors")
        if func is aten.lift_fresh.default:      # torch.tensor(...) of Python values: kept as it is
            self._own(out)
            return out
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        seen = {_storage(t)[0] for t in inputs}
        new = [r for r in results if isinstance(r, torch.Tensor) and _storage(r)[1]
               and _storage(r)[0] not in seen and self.buffer_at(_storage(r)[0]) is None
               and _storage(r)[0] not in self.owned]
        for r in new:
            self._new_buffer(r)
        if func in ALLOCATIONS:
            return out
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if not new and not mutates:              # a view: the steps that read it touch its buffer
            return out
        for t in inputs + [r for r in results if isinstance(r, torch.Tensor)]:
            if _storage(t)[1]:
                self.touch(_storage(t)[0], str(func))
        self.steps.append(("torch", func, args, kwargs, out))
        return out

    def kernel(self, fn, args: tuple, result) -> None:
        """One C call (``c_build.capture``): its pointers, including those inside records passed by reference."""
        where = f"kernel {fn.__name__}"
        types = fn.argtypes
        if types is None or len(types) != len(args):
            raise NotReplayable(f"{where} has no argument types to tell its pointers from its integers")
        for typ, arg in zip(types, args):
            if typ is ctypes.c_void_p and arg is not None:
                self.touch(arg, where)
            elif isinstance(arg, BYREF):
                for address in _record_pointers(arg._obj):
                    self.touch(address, where)
        self.steps.append(("kernel", fn, args, result))


def _pointer_fields(record) -> list[str]:
    """The fields of a kernel record (Epilogue, Softmax) that point into tensors: a Softmax's ``logits`` points to
    the Epilogue record held as its last ``.tensors`` entry instead."""
    return [name for name, typ in record._fields_ if typ is ctypes.c_void_p and name != "logits"]


def _logits(record):
    """The Epilogue a Softmax record's logits point to, or None."""
    return record.tensors[-1] if isinstance(record, Softmax) and record.logits else None


def _record_pointers(record) -> list[int]:
    """The addresses a kernel record holds, with those of the Epilogue its logits point to."""
    found = [getattr(record, name) for name in _pointer_fields(record)]
    if _logits(record) is not None:
        found += _record_pointers(_logits(record))
    return [a for a in found if a]


class Plan:
    """One captured forward laid out in an arena: call ``run(inputs)`` for outputs (fresh tensors)."""

    def __init__(self, capture: _Capture, slots: list[torch.Tensor], outputs: tuple[torch.Tensor, ...]):
        self.slots = slots
        end = len(capture.steps)
        for t in outputs:
            b = capture.buffer_at(t.data_ptr()) if isinstance(t, torch.Tensor) and _storage(t)[1] else None
            if b is None:
                raise NotReplayable("an output is an input, a constant or empty, not a tensor the forward computed")
            b.last = end
        size = _lay_out(list(capture.buffers.values()))
        with torch.inference_mode():
            self.arena = torch.empty(max(size, 1), dtype=torch.uint8)
        self._capture = capture
        self.held = []                           # relocated records, and the storages they may point into
        self.steps = _batched([self._step(s) for s in capture.steps])
        self.outputs = tuple(self._tensor(t) for t in outputs)
        self.held.append([s for _, (_, s) in capture.owned.items()])
        del self._capture                        # the captured storages are freed

    def _address(self, address):
        if not address:
            return address
        b = self._capture.buffer_at(address)
        return address if b is None else self.arena.data_ptr() + b.offset + (address - b.start)

    def _record(self, record):
        copy = type(record).from_buffer_copy(record)
        for name in _pointer_fields(record):
            setattr(copy, name, self._address(getattr(record, name)))
        if _logits(record) is not None:
            copy.logits = ctypes.addressof(self._record(_logits(record)))     # held by that call
        self.held.append(copy)        # not record: its .tensors would keep the captured activations alive
        return copy

    def _tensor(self, t):
        if not isinstance(t, torch.Tensor) or not _storage(t)[1]:
            return t
        b = self._capture.buffer_at(t.untyped_storage().data_ptr())
        if b is None:
            return t
        with torch.inference_mode():
            moved = torch.empty(0, dtype=t.dtype)
            offset = b.offset + t.storage_offset() * t.element_size()
            return moved.set_(self.arena.untyped_storage(), offset // t.element_size(), t.shape, t.stride())

    def _step(self, step):
        if step[0] == "kernel":
            _, fn, args, result = step
            moved = []
            for typ, arg in zip(fn.argtypes, args):
                if typ is ctypes.c_void_p:
                    moved.append(self._address(arg))
                elif isinstance(arg, BYREF):
                    moved.append(ctypes.byref(self._record(arg._obj)))
                else:
                    moved.append(arg)
            return _KernelCall(fn, moved, result)
        _, func, args, kwargs, out = step
        args, kwargs = pytree.tree_map(self._tensor, (args, kwargs))
        targets = [self._tensor(r) for r in pytree.tree_leaves(out)]
        return functools.partial(_torch_step, func, args, kwargs, targets)

    def run(self, inputs) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            for slot, x in zip(self.slots, inputs):
                slot.copy_(x)
            for step in self.steps:
                step()
        return tuple(o.clone() for o in self.outputs)


class _KernelCall:
    """A recorded kernel call with its relocated arguments; a status other than the captured one ends the replay."""
    __slots__ = ("fn", "args", "result")

    def __init__(self, fn, args: list, result):
        self.fn, self.args, self.result = fn, args, result

    def __call__(self):
        got = self.fn(*self.args)
        if self.result is not None and got != self.result:
            raise self.changed(got)

    def changed(self, got) -> NotReplayable:
        return NotReplayable(f"kernel {self.fn.__name__} returned {got}, {self.result} under capture")

    def words(self) -> list[int] | None:
        """The arguments as go_run_calls passes them (64-bit words), or None where it cannot: a float argument
        (not passed in the integer registers), a result it cannot compare, too many arguments."""
        if len(self.args) > Call.CALL_ARGS or self.fn.restype not in (None, ctypes.c_int32, ctypes.c_int64):
            return None
        words = []
        for typ, arg in zip(self.fn.argtypes, self.args):
            if isinstance(arg, BYREF):
                words.append(ctypes.addressof(arg._obj))
            elif (typ in (ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p) or issubclass(typ, ctypes._Pointer)) and (
                    arg is None or isinstance(arg, int)):
                words.append((arg or 0) & WORD)
            else:
                return None
        return words


class _Calls:
    """A run of recorded kernel calls made from C in one ctypes call (go_run_calls): ctypes converts each call's
    arguments in 2-5 us. DeiT-S b1 (120 steps -> 5) took 18.6 ms against 19.4 calling each kernel from Python."""

    def __init__(self, run_calls, calls: list[tuple[_KernelCall, list[int]]]):
        self.run_calls, self.calls = run_calls, [call for call, _ in calls]
        self.records = (Call * len(calls))()
        for record, (call, words) in zip(self.records, calls):
            record.fn = ctypes.cast(call.fn, ctypes.c_void_p).value
            record.a[:len(words)] = words
            if call.result is not None:
                record.check, record.status = (64 if call.fn.restype is ctypes.c_int64 else 32), call.result

    def __call__(self):
        stopped = self.run_calls(self.records, len(self.calls))
        if stopped < len(self.calls):
            raise self.calls[stopped].changed(self.records[stopped].got)


def _batched(steps: list) -> list:
    """steps with each run of two or more kernel calls go_run_calls can make replaced by one _Calls."""
    run_calls = getattr(library(), "go_run_calls", None)
    if run_calls is None:
        return steps
    out, run = [], []
    for step in steps + [None]:
        words = step.words() if isinstance(step, _KernelCall) else None
        if words is not None:
            run.append((step, words))
            continue
        out += [_Calls(run_calls, run)] if len(run) > 1 else [call for call, _ in run]
        run = []
        if step is not None:
            out.append(step)
    return out


def _torch_step(func, args, kwargs, targets):
    for got, target in zip(pytree.tree_leaves(func(*args, **kwargs)), targets):
        if isinstance(got, torch.Tensor) and got.data_ptr() != target.data_ptr():
            if got.shape != target.shape:
                raise NotReplayable(f"{func} made shape {tuple(got.shape)}, {tuple(target.shape)} under capture")
            target.copy_(got)


def _lay_out(buffers: list[_Buffer]) -> int:
    """Offsets for ``buffers`` in one arena, first fit, largest first; overlapping lifetimes never share bytes."""
    placed: list[_Buffer] = []
    for b in sorted(buffers, key=lambda b: -b.nbytes):
        live = sorted((p.offset, p.offset + p.nbytes) for p in placed if p.first <= b.last and b.first <= p.last)
        offset = 0
        for start, stop in live:
            if offset + b.nbytes <= start:
                break
            offset = max(offset, -(-stop // ALIGN) * ALIGN)
        b.offset = offset
        placed.append(b)
    end = max((b.offset + b.nbytes for b in buffers), default=0)
    return -(-end // ALIGN) * ALIGN      # whole elements of every dtype: torch asserts so for some views (BEiT)


class Replay:
    """Per input signature: seen once (runs as is), seen twice (captured), then replayed. ``refused``: why a
    signature is not replayed. One call replays at a time; a concurrent call runs as is. ``refuse``: why no
    signature can be (the forward computes outside what the capture sees), or None."""

    def __init__(self, run, constants: list[torch.Tensor], refuse: str | None = None):
        self._run, self._constants, self._refuse = run, constants, refuse
        self.plans: OrderedDict = OrderedDict()
        self.refused: dict = {}
        self._seen: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, *tensors: torch.Tensor):
        key = tuple((tuple(t.shape), t.stride(), t.dtype, t.device.type) for t in tensors)
        if self._refuse is not None:
            self.refused[key] = self._refuse
            return self._run(*tensors)
        if key in self.refused or not self._lock.acquire(blocking=False):
            return self._run(*tensors)
        try:
            plan = self.plans.get(key)
            if plan is not None:
                try:
                    return plan.run(tensors)
                except NotReplayable as e:
                    del self.plans[key]
                    self.refused[key] = str(e)
                    return self._run(*tensors)
            if key not in self._seen:
                self._seen[key] = True
                while len(self._seen) > 4 * PLANS:
                    self._seen.popitem(last=False)
                return self._run(*tensors)
            return self._capture(key, tensors)
        finally:
            self._lock.release()

    def _capture(self, key, tensors):
        if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
            self.refused[key] = "an input is not a contiguous CPU tensor"
            return self._run(*tensors)
        slots = [t.detach().clone() for t in tensors]
        capture = _Capture(slots + self._constants)
        try:
            with capture, c_build.capture(capture.kernel):
                outputs = self._run(*slots)
            plan = Plan(capture, slots, tuple(outputs))
        except NotReplayable as e:
            self.refused[key] = str(e)
            return self._run(*tensors)
        replayed = plan.run(slots)
        if not all(_same(a, b) for a, b in zip(replayed, outputs)):
            self.refused[key] = "the replay's outputs differ from the forward's"
            return self._run(*tensors)
        self.plans[key] = plan
        while len(self.plans) > PLANS:
            self.plans.popitem(last=False)
        return outputs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or
                                                              (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                                               and torch.equal(a.nan_to_num(), b.nan_to_num())))
