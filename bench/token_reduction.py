"""Token reduction figures (issue 6): ToMe speed on a DeiT-S-shaped ViT (torch and ONNX Runtime),
the accuracy/throughput curve over r on the digits-trained ViT (plotted in the HTML report), token
dropping on a LLaVA-style VLM, and token_merge composed with integer_only in both orders.

    python -m graphopt.bench.token_reduction            # everything (about 10 minutes on 2 cores)
    python -m graphopt.bench.token_reduction --only deit,digits,vlm,compose --reps 7 --threads 2 --batch 256

Timings are medians of interleaved runs in one process (variants alternate within every
repetition), so load from other jobs hits all variants alike; re-run on a quiet machine for
final numbers. Results: bench/results/token_reduction.{json,html}.

On a shared machine run multi-threaded torch with ``OMP_WAIT_POLICY=PASSIVE``: by default OpenMP
workers busy-wait after every parallel op and take the cores the main thread needs, which made
DeiT-S at 2 threads 3x slower (and merged graphs, with more small ops, slower than unmerged ones:
0.7x instead of 1.95x) under a load average of 3.5 on 2 cores.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os

import torch

import graphopt
from graphopt import zoo
from graphopt.ir.cost import graph_cost
from graphopt.timing import interleaved

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# ---- models ---------------------------------------------------------------------------------
def deit_s():
    """DeiT-S/16 shape (HF ViTForImageClassification, random weights)."""
    return zoo.deit_small().model


def llava():
    """The zoo's LLaVA-style model at the size of these figures: CLIP tower 2x128 (64px, patch 8: 64
    visual tokens), Llama 4x256, 96 tokens per prompt (the image's among them), batch 1."""
    return zoo.llava(96, batch=1, image=64, vision_hidden=128, text_hidden=256, text_layers=4, vocab=1000,
                     vision_feature_layer=-2, max_positions=512)


# ---- timing ---------------------------------------------------------------------------------
def medians(fns: dict, reps: int) -> dict:
    """Median seconds per variant, timed with graphopt.timing's policy, without autograd."""
    with torch.no_grad():
        return {k: t.median for k, t in interleaved(fns, reps).items()}


def flops(graph, **dims):
    return graph_cost(graph).at(**dims)["flops"]


# ---- figures --------------------------------------------------------------------------------
def bench_deit(reps, rs=(8, 13, 16, 18, 20, 24)):
    model = deit_s()
    x = torch.randn(8, 3, 224, 224)
    variants = {"none": []} | {f"r={r}": [f"token_merge:r={r}"] for r in rs}
    oms = {k: graphopt.optimize(model, p, (x,)) for k, p in variants.items()}
    fns = {}
    for k, om in oms.items():
        fns[("torch", k)] = (lambda om=om: om(x))
        ort = graphopt.pipeline.OptimizedModel(om.graph, om.report, "onnxruntime", {"threads": torch.get_num_threads()})
        fns[("onnxruntime", k)] = (lambda ort=ort: ort(x))
    # one interleaved block per backend: ONNX Runtime's spinning workers would otherwise slow the torch call after them
    t = {}
    for be in ("torch", "onnxruntime"):
        t.update(medians({k: f for k, f in fns.items() if k[0] == be}, reps))
    base_flops = flops(oms["none"].graph, batch=8)
    rows = []
    for k, om in oms.items():
        row = {"variant": k, "flops_ratio": flops(om.graph, batch=8) / base_flops}
        for be in ("torch", "onnxruntime"):
            row[f"{be}_ms"] = 1000 * t[(be, k)]
            row[f"{be}_speedup"] = t[(be, "none")] / t[(be, k)]
        rows.append(row)
        print(f"DeiT-S b8 {k:>6}: torch {row['torch_ms']:.0f} ms ({row['torch_speedup']:.2f}x)  "
              f"ORT {row['onnxruntime_ms']:.0f} ms ({row['onnxruntime_speedup']:.2f}x)  FLOPs x{row['flops_ratio']:.3f}",
              flush=True)
    ok = [r for r in rows if r["variant"] != "none" and r["torch_speedup"] >= 1.8 and r["onnxruntime_speedup"] >= 1.8]
    return {"rows": rows, "first_r_at_1.8x_both": ok[0]["variant"] if ok else None}


DIGITS_VARIANTS = {f"r={r}": [f"token_merge:r={r}"] if r else [] for r in (0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32)} | {
    f"linear r={r}": [f"token_merge:r={r},schedule=linear"] for r in (8, 12, 16)} | {
    "r=16 no prop_attn": ["token_merge:r=16,prop_attn=false"]}


def tokens_at_run_time(graph, x) -> list[int]:
    """Tokens each attention really sees (the keys' length in a run); raises if they differ from
    the graph's types, which the pass derived from the schedule."""
    from graphopt.ir.interpreter import collect
    taps = [(n.inputs[1], -2) for n in graph.find_nodes("sdpa")] or \
        [(n.output, -1) for n in graph.nodes if n.op == "softmax" and n.output.type.rank == 4]  # keys / probs
    got = next(collect(graph, [(x,)], [v for v, _ in taps]))
    counts = [got[v.name].shape[axis] for v, axis in taps]
    planned = [int(v.type.shape[axis]) for v, axis in taps]
    if counts != planned:
        raise AssertionError(f"tokens per block at run time {counts}, the schedule (graph types) says {planned}")
    return counts


def bench_digits(reps, case=None, batch=256):
    """Accuracy on the 450 test images and throughput at ``batch`` for each variant (the digits ViT
    has 65 tokens and 4 blocks, so r is clamped to 32, 16, 8, 4 at most in its blocks)."""
    case = case if case is not None else zoo.digits_vit()
    xs, xb = case.test_images, case.test_images[:batch]
    oms = {k: graphopt.optimize(case.model, p, (xs[:8],)) for k, p in DIGITS_VARIANTS.items()}
    with torch.no_grad():
        base_logits = case.model(xs).logits
    t = medians({k: (lambda om=om: om(xb)) for k, om in oms.items()}, reps)
    rows = []
    for k, om in oms.items():
        counts = tokens_at_run_time(om.graph, xs[:2])
        with torch.no_grad():
            logits = om(xs).logits
        acc = (logits.argmax(-1) == case.test_labels).float().mean().item()
        rows.append({"variant": k, "accuracy": acc, "tokens_per_block": counts, "ms": 1000 * t[k],
                     "throughput_x": t["r=0"] / t[k],
                     "flips_vs_unmerged": int((logits.argmax(-1) != base_logits.argmax(-1)).sum()),
                     "max_logit_change": (logits - base_logits).abs().max().item(),
                     "flops_ratio": flops(om.graph, batch=batch) / flops(oms["r=0"].graph, batch=batch)})
        row = rows[-1]
        print(f"digits ViT {k:>18}: accuracy {100 * acc:.2f}% ({row['flips_vs_unmerged']} predictions changed, "
              f"max |logit change| {row['max_logit_change']:.3f}), tokens {counts}, batch {batch} {row['ms']:.1f} ms "
              f"({row['throughput_x']:.2f}x, FLOPs x{row['flops_ratio']:.2f})", flush=True)
    base = rows[0]["accuracy"]
    fast = [r for r in rows if r["throughput_x"] >= 1.5]
    pick = max(fast, key=lambda r: (r["accuracy"], r["throughput_x"])) if fast else None
    out = {"batch": batch, "threads": torch.get_num_threads(), "float accuracy": base, "rows": rows, "best_at_1.5x": pick,
           "drop_points_at_1.5x": None if pick is None else 100 * (base - pick["accuracy"])}
    print(f"digits ViT at >= 1.5x throughput: " + ("none reached 1.5x" if pick is None else
          f"{pick['variant']} {pick['throughput_x']:.2f}x, accuracy {100 * pick['accuracy']:.2f}% "
          f"(drop {out['drop_points_at_1.5x']:.2f} points)"), flush=True)
    return out


def bench_vlm(reps):
    case = llava()
    model, inputs = case.model, case.kwargs
    kw = ((), inputs)
    variants = {"full": [], "connector keep=0.25": ["token_drop:keep=0.25"],
                "fastv K=2 keep=0.25": ["token_drop:where=language,layer=2,keep=0.25"]}
    oms = {k: graphopt.optimize(model, p, kw, dynamic_batch=False) for k, p in variants.items()}
    t = medians({k: (lambda om=om: om(**inputs)) for k, om in oms.items()}, reps)
    base_flops = flops(oms["full"].graph)
    rows = []
    for k, om in oms.items():
        rows.append({"variant": k, "ms": 1000 * t[k], "measured_ratio": t[k] / t["full"],
                     "flops_ratio": flops(om.graph) / base_flops, "notes": om.report.passes[-1].notes if om.report.passes else []})
        print(f"VLM prefill {k:>20}: {1000 * t[k]:.1f} ms (x{t[k] / t['full']:.3f} measured, "
              f"x{rows[-1]['flops_ratio']:.3f} FLOPs)", flush=True)
    return {"rows": rows}


def bench_compose(reps, case=None, batch=256, rs=(8, 16)):
    """integer_only + token_merge in both orders on the digits ViT (calibrated on 64 training images):
    test accuracy, whether the run-time graph is integer-only, and speed against integer_only alone
    (torch and ONNX Runtime, interleaved)."""
    from graphopt.passes.integer_only import float_ops
    case = case if case is not None else zoo.digits_vit()
    xs, xb = case.test_images, case.test_images[:batch]
    calib = [(case.train_images[i:i + 32],) for i in range(0, 64, 32)]
    variants = {"float": [], "integer_only": ["integer_only"]}
    for r in rs:
        variants |= {f"token_merge r={r}": [f"token_merge:r={r}"],
                     f"integer_only -> token_merge r={r}": ["integer_only", f"token_merge:r={r}"],
                     f"token_merge r={r} -> integer_only": [f"token_merge:r={r}", "integer_only"]}
    oms = {k: graphopt.optimize(case.model, p, (xs[:8],), calibration=calib if "integer_only" in p else None)
           for k, p in variants.items()}
    fns = {}
    for k, om in oms.items():
        ort = graphopt.pipeline.OptimizedModel(om.graph, om.report, "onnxruntime", {"threads": torch.get_num_threads()})
        fns[("torch", k)] = (lambda om=om: om(xb))
        fns[("onnxruntime", k)] = (lambda ort=ort: ort(xb))
        if "integer_only" in variants[k] and not torch.equal(ort(xs).logits, om(xs).logits):
            raise AssertionError(f"{k}: ONNX Runtime and the torch reference differ on an integer graph")
    t = {}
    for be in ("torch", "onnxruntime"):
        t.update(medians({k: f for k, f in fns.items() if k[0] == be}, reps))
    rows = []
    for k, om in oms.items():
        g = om.graph
        row = {"variant": k, "accuracy": case.accuracy(om), "int.token_merge": g.op_counts().get("int.token_merge", 0),
               "float token_merge": g.op_counts().get("token_merge", 0),
               "float ops": len(float_ops(g)) if "integer_only" in variants[k] else None}
        for be in ("torch", "onnxruntime"):
            row[f"{be}_ms"] = 1000 * t[(be, k)]
            row[f"{be}_vs_integer_only"] = t[(be, "integer_only")] / t[(be, k)]
        rows.append(row)
        print(f"compose {k:>32}: accuracy {100 * row['accuracy']:.2f}%  torch {row['torch_ms']:.1f} ms "
              f"({row['torch_vs_integer_only']:.2f}x vs integer_only)  ORT {row['onnxruntime_ms']:.1f} ms "
              f"({row['onnxruntime_vs_integer_only']:.2f}x)  float ops besides the edges: {row['float ops']}", flush=True)
    return {"batch": batch, "threads": torch.get_num_threads(), "rows": rows}


def html(results) -> str:
    parts = ["<html><head><meta charset='utf-8'><title>token reduction</title></head><body>",
             "<h1>Token merging and dropping</h1><p>Medians of interleaved runs; 2-core CPU shared with other "
             "jobs: re-run on a quiet machine for final figures.</p>"]
    if "digits" in results:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = results["digits"]["rows"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pick in (("constant r", lambda v: v.startswith("r=") and "prop" not in v),
                            ("linear schedule", lambda v: v.startswith("linear")),
                            ("no proportional attention", lambda v: "prop" in v)):
            sel = [r for r in rows if pick(r["variant"])]
            ax.plot([r["throughput_x"] for r in sel], [100 * r["accuracy"] for r in sel],
                    "o-" if label == "constant r" else "s", label=label)
            for r in sel:
                ax.annotate(r["variant"].replace("linear ", "lin "), (r["throughput_x"], 100 * r["accuracy"]), fontsize=7)
        ax.axvline(1.5, color="grey", lw=0.5, ls="--")
        ax.axhline(100 * rows[0]["accuracy"] - 1, color="grey", lw=0.5, ls=":")
        ax.legend(fontsize=8)
        ax.set_xlabel(f"throughput vs r=0 (x), batch {results['digits']['batch']}, {results['digits']['threads']} thread(s)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("ToMe on the digits ViT")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        parts.append(f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>")
    for name, res in results.items():
        parts.append(f"<h2>{name}</h2><pre>{json.dumps(res, indent=1, default=str)}</pre>")
    return "\n".join(parts + ["</body></html>"])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="deit,digits,vlm,compose")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    ap.add_argument("--batch", type=int, default=256, help="batch at which digits throughput is measured")
    ap.add_argument("--tag", default="token_reduction", help="results go to bench/results/TAG.json and TAG.html")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores and OMP_WAIT_POLICY is not "
              "PASSIVE: busy-waiting OpenMP workers distort multi-threaded torch timings (see the docstring)")
    results = {"environment": {"threads": args.threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                               "load_average_at_start": os.getloadavg()}}
    os.makedirs(RESULTS, exist_ok=True)
    digits = []

    def digits_model():
        if not digits:
            digits.append(zoo.digits_vit())
        return digits[0]

    for name in args.only.split(","):
        results[name] = {"deit": lambda: bench_deit(args.reps), "digits": lambda: bench_digits(args.reps, digits_model(), args.batch),
                         "vlm": lambda: bench_vlm(args.reps), "compose": lambda: bench_compose(args.reps, digits_model(), args.batch)}[name]()
        with open(os.path.join(RESULTS, args.tag + ".json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(RESULTS, args.tag + ".html"), "w") as f:
            f.write(html(results))
    return results


if __name__ == "__main__":
    main()
