"""Token reduction figures (issue 6): ToMe speed on a DeiT-S-shaped ViT (torch and ONNX Runtime),
the accuracy/throughput curve on a digits-trained ViT, token dropping on a LLaVA-style VLM, and
composition with integer_only when that pass exists.

    python -m graphopt.bench.token_reduction            # everything (about 10 minutes on 2 cores)
    python -m graphopt.bench.token_reduction --only deit,digits,vlm,compose --reps 7

Timings are medians of interleaved runs in one process (variants alternate within every
repetition), so load from other jobs hits all variants alike; re-run on a quiet machine for
final numbers. Results: bench/results/token_reduction.{json,html}.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import time

import torch

import graphopt
from graphopt.ir.cost import graph_cost

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# ---- models ---------------------------------------------------------------------------------
def deit_s():
    """DeiT-S/16 shape (HF ViTForImageClassification, random weights) from graphopt.zoo."""
    from graphopt import zoo
    return zoo.deit_small().model.eval()


def llava(vision_layers=2, text_layers=4, hidden=256, image=64, patch=8, seed=0):
    """A LLaVA-style model (CLIP vision tower + projector + Llama) from transformers configs, random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=vision_layers,
                          num_attention_heads=4, image_size=image, patch_size=patch)
    tc = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=999, vision_feature_layer=-2)
    return LlavaForConditionalGeneration(cfg).eval()


def llava_inputs(model, batch=1, text=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    ids = torch.randint(0, 998, (batch, text + n_img), generator=g)
    ids[:, 4:4 + n_img] = model.config.image_token_index
    px = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": ids, "pixel_values": px, "use_cache": False}


def digits_vit():
    """The zoo's digits-trained ViT (trained once, cached by graphopt.zoo): (model, test images,
    test labels, calibration images)."""
    from graphopt import zoo
    case = zoo.digits_vit()
    return case.model, case.test_images, case.test_labels, case.train_images[:64]


# ---- timing ---------------------------------------------------------------------------------
def interleaved(fns: dict, reps: int, warmup: int = 3) -> dict:
    times = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for f in fns.values():
                f()
        for _ in range(reps):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def flops(graph, **dims):
    return graph_cost(graph).at(**dims)["flops"]


# ---- figures --------------------------------------------------------------------------------
def bench_deit(reps, rs=(8, 13, 16, 18, 20, 24)):
    torch.set_num_threads(2)
    model = deit_s()
    x = torch.randn(8, 3, 224, 224)
    variants = {"none": []} | {f"r={r}": [f"token_merge:r={r}"] for r in rs}
    oms = {k: graphopt.optimize(model, p, (x,)) for k, p in variants.items()}
    fns = {}
    for k, om in oms.items():
        fns[("torch", k)] = (lambda om=om: om(x))
        ort = graphopt.pipeline.OptimizedModel(om.graph, om.report, "onnxruntime", {"threads": 2})
        fns[("onnxruntime", k)] = (lambda ort=ort: ort(x))
    t = interleaved(fns, reps)
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


def bench_digits(reps, digits=None, rs=(0, 2, 4, 6, 8, 10, 12, 14)):
    torch.set_num_threads(2)
    model, xs, ys, _ = digits if digits is not None else digits_vit()
    rows = []
    oms = {r: graphopt.optimize(model, [f"token_merge:r={r}"] if r else [], (xs[:8],)) for r in rs}
    t = interleaved({r: (lambda om=om: om(xs)) for r, om in oms.items()}, reps)
    for r, om in oms.items():
        with torch.no_grad():
            acc = (om(xs).logits.argmax(-1) == ys).float().mean().item()
        rows.append({"r": r, "accuracy": acc, "ms": 1000 * t[r], "throughput_x": t[0] / t[r],
                     "flops_ratio": flops(om.graph, batch=8) / flops(oms[0].graph, batch=8)})
        print(f"digits ViT r={r:>2}: accuracy {100 * acc:.2f}%  {1000 * t[r]:.1f} ms ({t[0] / t[r]:.2f}x)", flush=True)
    base = rows[0]["accuracy"]
    at15 = [r for r in rows if r["throughput_x"] >= 1.5]
    pick = at15[0] if at15 else None
    return {"rows": rows, "at_1.5x": pick, "drop_points_at_1.5x": None if pick is None else 100 * (base - pick["accuracy"])}


def bench_vlm(reps):
    torch.set_num_threads(2)
    model = llava()
    inputs = llava_inputs(model)
    kw = ((), inputs)
    variants = {"full": [], "connector keep=0.25": ["token_drop:keep=0.25"],
                "fastv K=2 keep=0.25": ["token_drop:where=language,layer=2,keep=0.25"]}
    oms = {k: graphopt.optimize(model, p, kw, dynamic_batch=False) for k, p in variants.items()}
    t = interleaved({k: (lambda om=om: om(**inputs)) for k, om in oms.items()}, reps)
    base_flops = flops(oms["full"].graph)
    rows = []
    for k, om in oms.items():
        rows.append({"variant": k, "ms": 1000 * t[k], "measured_ratio": t[k] / t["full"],
                     "flops_ratio": flops(om.graph) / base_flops, "notes": om.report.passes[-1].notes if om.report.passes else []})
        print(f"VLM prefill {k:>20}: {1000 * t[k]:.1f} ms (x{t[k] / t['full']:.3f} measured, "
              f"x{rows[-1]['flops_ratio']:.3f} FLOPs)", flush=True)
    return {"rows": rows}


def bench_compose(digits=None):
    """integer_only + token_merge in both orders on the digits ViT (calibrated on 64 training-like images)."""
    if "integer_only" not in graphopt.list_passes():
        msg = "integer_only is not registered in this checkout yet: composition not measured"
        print(msg)
        return {"status": msg}
    model, xs, ys, train = digits if digits is not None else digits_vit()
    calib = [(train[i:i + 32],) for i in range(0, 64, 32)]
    out = {}
    with torch.no_grad():
        base = (model(xs).logits.argmax(-1) == ys).float().mean().item()
    out["float accuracy"] = base
    for order in (["token_merge:r=8"], ["integer_only"], ["integer_only", "token_merge:r=8"],
                  ["token_merge:r=8", "integer_only"]):
        key = " then ".join(order)
        try:
            om = graphopt.optimize(model, order, (xs[:8],), calibration=calib)
            with torch.no_grad():
                acc = (om(xs).logits.argmax(-1) == ys).float().mean().item()
            merged = len(om.graph.find_nodes("token_merge"))
            out[key] = f"ok: accuracy {100 * acc:.2f}% (float {100 * base:.2f}%), {merged} token_merge nodes"
        except Exception as e:  # report, do not hide
            out[key] = f"failed: {str(e).splitlines()[0][:400]}"
        print(f"compose {key}: {out[key]}", flush=True)
    return out


def html(results) -> str:
    parts = ["<html><head><meta charset='utf-8'><title>token reduction</title></head><body>",
             "<h1>Token merging and dropping</h1><p>Medians of interleaved runs; 2-core CPU shared with other "
             "jobs: re-run on a quiet machine for final figures.</p>"]
    if "digits" in results:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = results["digits"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["throughput_x"] for r in rows], [100 * r["accuracy"] for r in rows], "o-")
        for r in rows:
            ax.annotate(f"r={r['r']}", (r["throughput_x"], 100 * r["accuracy"]), fontsize=8)
        ax.set_xlabel("throughput vs r=0 (x)")
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
    ap.add_argument("--tag", default="token_reduction", help="results go to bench/results/TAG.json and TAG.html")
    args = ap.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    results = {}
    digits = []

    def digits_model():
        if not digits:
            digits.append(digits_vit())
        return digits[0]

    for name in args.only.split(","):
        results[name] = {"deit": lambda: bench_deit(args.reps), "digits": lambda: bench_digits(args.reps, digits_model()),
                         "vlm": lambda: bench_vlm(args.reps), "compose": lambda: bench_compose(digits_model())}[name]()
        with open(os.path.join(RESULTS, args.tag + ".json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(RESULTS, args.tag + ".html"), "w") as f:
            f.write(html(results))
    return results


if __name__ == "__main__":
    main()
