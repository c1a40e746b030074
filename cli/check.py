"""opt-cli --check: the input and output models run in ONNX Runtime, in a child process, on the same
inputs; outputs compared (max abs error, cosine) against limits from the passes' tolerances, and
both timed with graphopt.timing's policy."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile

from graphopt import timing
from graphopt.cli import EXIT_FAILED, CliError
from graphopt.cli.load import ModelSide
from graphopt.progress import task
from graphopt.timing import Timing

EXACT_MIN_COSINE, LOSSY_MIN_COSINE = 0.999, 0.9

# ONNX Runtime runs in a child process: a crash inside it (it segfaults on some valid models) must end
# in one line naming the model, not take opt-cli down. The child imports only onnxruntime, numpy and
# graphopt/timing.py (standard library only), loaded from its file.
_ORT_CHILD = r"""
import importlib.util, json, sys
import numpy as np
import onnxruntime as ort

folder = sys.argv[1]
cfg = json.load(open(folder + "/config.json"))

def stage(text):
    with open(folder + "/stage.txt", "w") as f:
        f.write(text)

def session(path, custom_ops=None):
    options = ort.SessionOptions()
    if custom_ops:  # as graphopt's custom_ops_session: no idle spinning against the kernels' pool threads
        options.register_custom_ops_library(custom_ops)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if cfg["threads"] is not None:
        options.intra_op_num_threads = cfg["threads"]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["level"])
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

try:
    stage("loading the input model")
    s_in = session(cfg["input"])
    stage("loading the output model")
    s_out = session(cfg["output"], cfg["custom_ops"])
    with np.load(folder + "/feeds.npz", allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    sides = {}
    for side, sess in (("in", s_in), ("out", s_out)):
        names = {i.name for i in sess.get_inputs()}
        sides[side] = (sess, {k: v for k, v in feeds.items() if k in names})
    stage("running the input model")
    ref = sides["in"][0].run(None, sides["in"][1])
    stage("running the output model")
    got = sides["out"][0].run(None, sides["out"][1])
    stage("timing both models")
    spec = importlib.util.spec_from_file_location("graphopt_timing", cfg["timing"])
    timing = sys.modules["graphopt_timing"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    timed = timing.interleaved({side: (lambda s=sess, f=side_feeds: s.run(None, f)) for side, (sess, side_feeds)
                                in sides.items()}, cfg["runs"], cfg["warmup"])
    times = {side: t.times for side, t in timed.items()}
    np.savez(folder + "/ref.npz", *[np.asarray(a) for a in ref])
    np.savez(folder + "/got.npz", *[np.asarray(a) for a in got])
    result = {"times": times, "names_in": [o.name for o in s_in.get_outputs()],
              "names_out": [o.name for o in s_out.get_outputs()]}
except Exception as e:
    text = str(e).strip()
    result = {"error": text.splitlines()[0] if text else type(e).__name__}
with open(folder + "/stage.txt") as f:
    result["stage"] = f.read()
with open(folder + "/result.json", "w") as f:
    json.dump(result, f)
"""

_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def _run_ort_child(before: ModelSide, proto_out, staged_model, feeds, args, custom_ops=None) -> dict:
    """Run and time both models in a child process; returns its result (outputs as numpy lists).
    ``custom_ops``: the custom-op library the output model needs (--ort-custom-ops)."""
    import numpy as np

    from graphopt.backends.onnxruntime_backend import write_model

    with tempfile.TemporaryDirectory(prefix="graphopt-check-") as folder:
        source = before.path
        if source is None:
            source = os.path.join(folder, "input.onnx")
            write_model(before.proto, source)
        target = staged_model
        if target is None:
            target = os.path.join(folder, "output.onnx")
            write_model(proto_out, target)
        config = {"input": source, "output": target, "threads": args.threads, "level": _ORT_LEVELS[args.opt_level],
                  "runs": args.runs, "warmup": args.warmup,
                  "timing": timing.__file__, "custom_ops": custom_ops}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        np.savez(os.path.join(folder, "feeds.npz"), **feeds)
        # -P: no current-folder entry on sys.path, so a stray numpy.py there cannot shadow the real one
        done = subprocess.run([sys.executable, "-P", "-c", _ORT_CHILD, folder], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stage_file = os.path.join(folder, "stage.txt")
        stage = open(stage_file).read() if os.path.exists(stage_file) else "starting"
        if done.returncode < 0:
            try:
                name = signal.Signals(-done.returncode).name
            except ValueError:
                name = f"signal {-done.returncode}"
            raise CliError(f"--check: ONNX Runtime crashed ({name}) while {stage}; this is a bug in ONNX Runtime "
                           "on this model, the graphopt result was not checked and nothing was written", EXIT_FAILED)
        result_file = os.path.join(folder, "result.json")
        if done.returncode != 0 or not os.path.exists(result_file):
            last = done.stderr.decode(errors="replace").strip().splitlines()
            raise CliError(f"--check: the ONNX Runtime process failed while {stage}: "
                           f"{last[-1] if last else f'exit status {done.returncode}'}", EXIT_FAILED)
        with open(result_file) as f:
            result = json.load(f)
        if "error" in result:
            raise CliError(f"--check: onnxruntime failed while {result['stage']}: {result['error']}", EXIT_FAILED)
        for side in ("ref", "got"):
            with np.load(os.path.join(folder, f"{side}.npz"), allow_pickle=False) as data:
                result[side] = [data[f"arr_{i}"] for i in range(len(data.files))]
    return result


def check_limits(specs, atol, min_cosine) -> tuple[float, float, bool]:
    """(atol, min cosine, lossy): the user's, else from the passes' tolerances (lossy ones allow any error)."""
    tolerances = [spec.info.tolerance for spec in specs]
    lossy = any(t is None for t in tolerances)
    if atol is None:
        atol = math.inf if lossy else max(1e-4, sum(tolerances))
    if min_cosine is None:
        min_cosine = LOSSY_MIN_COSINE if lossy else EXACT_MIN_COSINE
    return atol, min_cosine, lossy


def _comparable(name: str, a, b, leading: int | None):
    """The parts of one output pair that can be compared element-wise, and why the rest cannot. A token pass
    changes the token axis' length: only the leading tokens it keeps in place (CLS) still line up."""
    if a.shape == b.shape:
        return a, b, None
    changed = [i for i in range(a.ndim) if a.ndim == b.ndim and a.shape[i] != b.shape[i]]
    why = f"shape {list(a.shape)} -> {list(b.shape)}"
    if len(changed) != 1 or leading is None:
        return None, None, f"{why}: not comparable element-wise"
    axis = changed[0]
    why += f" (tokens merged or dropped along axis {axis})"
    if not leading:
        return None, None, f"{why}: no token stays in place to compare (no leading special token)"
    index = (slice(None),) * axis + (slice(0, leading),)
    return a[index], b[index], f"{why}: compared on the {leading} leading token(s) kept in place (CLS); the rest " \
                               "are merged or dropped"


def _real_positions(a, b, why, mask_name: str, mask):
    """Only the real positions of a [batch, tokens, ...] output pair: zero_padded_positions set the padded ones
    to 0, which nobody reads, so comparing them would fail a correct model."""
    if a is None or mask is None or a.shape != b.shape or a.ndim < 2 or a.shape[:2] != mask.shape:
        return a, b, why
    keep = mask != 0
    note = (f"compared at the {int(keep.sum())} real positions of {mask_name!r}; zero_padded_positions set the "
            f"{int(keep.size - keep.sum())} padded ones to 0")
    return a[keep], b[keep], note if why is None else f"{why}; {note}"


def check(before: ModelSide, proto_out, staged_model, feeds, args, specs, leading_tokens=None,
          custom_ops=None, mask_name=None) -> dict:
    """Run both models in ONNX Runtime on ``feeds``: errors, cosine, latencies, and whether the limits hold.
    ``custom_ops``: the custom-op library the output model needs (--ort-custom-ops). ``mask_name``: the
    input whose zeros mark positions the output model leaves at 0 (zero_padded_positions)."""
    import numpy as np

    with task(f"ONNX Runtime: both models, {args.warmup} warm-up + {args.runs} timed runs each", key="check"):
        result = _run_ort_child(before, proto_out, staged_model, feeds, args, custom_ops)
    ref, got = result["ref"], result["got"]
    out_names_in, out_names_out = result["names_in"], result["names_out"]
    t_in, t_out = Timing(result["times"]["in"]), Timing(result["times"]["out"])
    if len(out_names_out) != len(out_names_in):
        raise CliError(f"--check: the input model has {len(out_names_in)} outputs, the output model "
                       f"{len(out_names_out)}", EXIT_FAILED)
    pairs = []
    for i, name in enumerate(out_names_in):
        j = out_names_out.index(name) if name in out_names_out else i
        if j < len(got):
            pairs.append((name, np.asarray(ref[i]), np.asarray(got[j])))
    per_output, worst, scale = {}, 0.0, 1.0
    dots = norm_a = norm_b = 0.0
    mask = np.asarray(feeds[mask_name]) if mask_name is not None and mask_name in feeds else None
    for name, a_full, b_full in pairs:
        a, b, why = _real_positions(*_comparable(name, a_full, b_full, leading_tokens), mask_name, mask)
        if a is None:
            per_output[name] = {"max_abs_error": None, "compared": why}
            continue
        a64, b64 = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
        nan_a, nan_b = np.isnan(a64), np.isnan(b64)
        diff = np.abs(a64 - b64)
        diff[nan_a & nan_b] = 0.0
        diff[nan_a != nan_b] = np.inf
        err = float(np.max(diff)) if diff.size else 0.0
        per_output[name] = {"max_abs_error": err} if why is None else {"max_abs_error": err, "compared": why}
        worst = max(worst, err)
        finite = np.isfinite(a64)
        if finite.any():
            scale = max(scale, float(np.max(np.abs(a64[finite]))))
        a64, b64 = np.nan_to_num(a64), np.nan_to_num(b64)
        dots += float(a64 @ b64)
        norm_a += float(a64 @ a64)
        norm_b += float(b64 @ b64)
    cosine = dots / math.sqrt(norm_a * norm_b) if norm_a > 0 and norm_b > 0 else (1.0 if norm_a == norm_b else 0.0)
    atol, min_cosine, lossy = check_limits(specs, args.atol, args.min_cosine)
    limit = atol * scale
    problems = []
    if all(o["max_abs_error"] is None for o in per_output.values()):
        problems.append("no output can be compared: " + "; ".join(f"{n}: {o['compared']}" for n, o in per_output.items()))
    if not worst <= limit:
        problems.append(f"max abs error {worst:.3g} > {limit:.3g} (--atol {atol:g} x output scale {scale:.3g})")
    if not cosine >= min_cosine:
        problems.append(f"cosine similarity {cosine:.6f} < {min_cosine:g} (--min-cosine)")
    passed = not problems
    verdict = "; ".join(problems) if problems else (
        f"max abs error {worst:.3g} <= {limit:.3g}, cosine {cosine:.6f} >= {min_cosine:g}")
    med_in, med_out = t_in.median, t_out.median
    return {"max_abs_error": worst, "cosine": cosine, "outputs": per_output, "passed": passed, "verdict": verdict,
            "atol": atol, "output_scale": scale, "min_cosine": min_cosine, "lossy_passes": lossy,
            "latency_before_ms": med_in * 1e3, "latency_after_ms": med_out * 1e3,
            "latency_before_p10_p90_ms": [t_in.p10 * 1e3, t_in.p90 * 1e3],
            "latency_after_p10_p90_ms": [t_out.p10 * 1e3, t_out.p90 * 1e3],
            "latency_ratio": med_out / med_in if med_in > 0 else float("nan"),
            "runs": args.runs, "warmup": args.warmup, "threads": args.threads, "optimization_level": args.opt_level}
