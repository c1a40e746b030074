"""The inputs opt-cli runs the model on (for --check, --verify-passes and calibration): the arrays of
a --calib file, checked against the model's inputs, or random ones sized by --dim and capped."""
from __future__ import annotations

import math
import os

from graphopt.cli import CliError, one_line
from graphopt.cli.report import human_bytes
from graphopt.ir.index_inputs import index_bound

MAX_RANDOM_INPUT_BYTES = 1 << 30  # random inputs for --check / --verify-passes, all together


def parse_dims(items) -> dict[str, int]:
    """--dim NAME=SIZE items as {name: size}."""
    dims = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise CliError(f"--dim {item!r}: write NAME=SIZE with a positive integer size, e.g. --dim batch=8")
        dims[name.strip()] = int(value)
    return dims


def model_inputs(args, graph, dims, example=None):
    """Feeds (name -> numpy) for --check and --verify-passes; calibration samples when --calib is given.
    Random feeds are made only when something runs the model, and refused over MAX_RANDOM_INPUT_BYTES."""
    import numpy as np

    if args.calib:
        samples, casts = read_calib(args.calib, graph)
        cast = f" ({', '.join(casts)})" if casts else ""
        note = {"source": f"calibration file {args.calib}{cast}", "samples": len(samples),
                "shapes": {k: list(v.shape) for k, v in samples[0].items()}}
        return samples[0], note, samples
    if example is not None and not dims:
        note = {"source": "the example's inputs", "shapes": {k: list(v.shape) for k, v in example.items()}}
        return example, note, None
    bindings, used = _bind_dims(graph, dims)
    shapes = {value.name: [_evaluate(d, bindings) for d in value.type.shape] for value in graph.inputs}
    if not (args.check or args.verify_passes):
        return None, {"source": "none (nothing runs the model)", "dims": used, "shapes": shapes}, None
    total, largest = 0, None
    for value in graph.inputs:
        size = math.prod(shapes[value.name]) * value.type.dtype.itemsize
        total += size
        if largest is None or size > largest[1]:
            largest = (value.name, size)
    if total > MAX_RANDOM_INPUT_BYTES:
        raise CliError(f"random inputs for --check / --verify-passes would take {human_bytes(total)} (input "
                       f"'{largest[0]}' is {shapes[largest[0]]}); the limit is {human_bytes(MAX_RANDOM_INPUT_BYTES)}: "
                       "set smaller symbolic dims with --dim, or give inputs with --calib")
    rng = np.random.default_rng(args.seed)
    feeds = {value.name: _random_input(value, shapes[value.name], rng) for value in graph.inputs}
    note = {"source": f"random (seed {args.seed})", "dims": used, "shapes": shapes}
    return feeds, note, None


def _bind_dims(graph, dims):
    symbols = sorted({s for v in graph.inputs for d in v.type.shape if not isinstance(d, int)
                      for s in d.free_symbols}, key=lambda s: s.name)
    unknown = set(dims) - {s.name for s in symbols}
    if unknown:
        raise CliError(f"--dim {', '.join(sorted(unknown))}: the model has no such input dim "
                       f"(its symbolic dims: {', '.join(s.name for s in symbols) or 'none'})")
    bindings, used = {}, {}
    for s in symbols:
        value = dims.get(s.name, _default_size(s.name))
        bindings[s] = value
        used[s.name] = value
    return bindings, used


def _default_size(name: str) -> int:
    lowered = name.lower()
    return 1 if "batch" in lowered or lowered in ("n", "b", "bs") else 16


def _evaluate(dim, bindings) -> int:
    """The dim's size; substitutes only the dim's own symbols (all of them per dim would be quadratic)."""
    if isinstance(dim, int):
        return dim
    own = {s: bindings[s] for s in dim.free_symbols}
    value = own[dim] if dim.is_Symbol else dim.xreplace(own)
    if not getattr(value, "is_Integer", isinstance(value, int)) or int(value) < 0:
        given = ", ".join(f"{s}={v}" for s, v in sorted(own.items(), key=lambda kv: kv[0].name))
        raise CliError(f"input dim {dim} does not evaluate to a size with {given}; set it with --dim")
    return int(value)


def _random_input(value, shape, rng):
    import numpy as np
    import torch

    dtype = value.type.dtype
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype if dtype is not torch.bfloat16 else np.float32
    name = value.name.lower()
    if dtype.is_floating_point:
        return rng.standard_normal(shape, dtype=np.float32).astype(np_dtype, copy=False)
    if dtype is torch.bool:
        return np.ones(shape, dtype=bool) if "mask" in name else rng.integers(0, 2, shape).astype(bool)
    if "mask" in name:
        return np.ones(shape, dtype=np_dtype)
    if "type" in name or "segment" in name:
        return np.zeros(shape, dtype=np_dtype)
    high = index_bound(value) or 2
    return rng.integers(0, high, shape).astype(np_dtype)




def read_calib(path, graph):
    """The samples (name -> array) and the casts made to the inputs' dtypes ("x float64 cast to float32");
    a CliError when an array does not fit its input, or a cast would change a value's meaning (an integer
    outside the input's range, a finite float past its largest)."""
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise CliError(f"calibration file {path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":                 # numpy's own message would suggest allow_pickle
            raise CliError(f"calibration file {path} is not an .npz archive: write one with numpy.savez(path, "
                           "<input name>=<array>, ...), one array per model input")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # not an npz, truncated, or pickled objects
        raise CliError(f"calibration file {path} is not a readable .npz of arrays: {one_line(e)}") from None
    names = [v.name for v in graph.inputs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no array for input(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown name(s) {', '.join(extra)}")
        raise CliError(f"calibration file {path}: {'; '.join(parts)} (model inputs: {', '.join(names)})")
    counts = set()
    per_input = {}
    casts = []
    for value in graph.inputs:
        array = arrays[value.name]
        rank = value.type.rank
        if array.ndim not in (rank, rank + 1):
            raise CliError(f"calibration file {path}: array {value.name!r} has shape {list(array.shape)}, the input "
                           f"is {value.type} (give it that rank, or one more for several samples)")
        want = torch.empty((), dtype=value.type.dtype).numpy().dtype if value.type.dtype is not torch.bfloat16 else None
        if want is not None and array.dtype != want:
            if not np.can_cast(array.dtype, want, casting="same_kind") or \
                    np.issubdtype(array.dtype, np.floating) != np.issubdtype(want, np.floating):   # as a call refuses
                raise CliError(f"calibration file {path}: array {value.name!r} is {array.dtype}, the input is {want}")
            with np.errstate(over="ignore", invalid="ignore"):     # what it changed is checked next
                cast = array.astype(want)
            changed = (cast != array) if np.issubdtype(want, np.integer) else (np.isfinite(array) & ~np.isfinite(cast))
            if changed.any():
                at = tuple(int(i) for i in np.argwhere(changed)[0])
                raise CliError(f"calibration file {path}: array {value.name!r} is {array.dtype} and holds "
                               f"{array[at].item()!r} at {list(at)}, which {want} (the input's dtype) cannot hold")
            casts.append(f"{value.name} {array.dtype} cast to {want}")
            array = cast
        per_input[value.name] = list(array) if array.ndim == rank + 1 else [array]
        counts.add(len(per_input[value.name]))
        for sample in per_input[value.name]:
            for d, size in zip(value.type.shape, sample.shape):
                if isinstance(d, int) and d != size:
                    raise CliError(f"calibration file {path}: array {value.name!r} has shape {list(sample.shape)}, "
                                   f"the input is {value.type}")
    if len(counts) != 1:
        raise CliError(f"calibration file {path}: inputs have different sample counts {sorted(counts)}")
    n = counts.pop()
    return [{name: per_input[name][i] for name in names} for i in range(n)], casts
