"""Integer-only transformers (issue 5): speed on the DeiT-S-shaped ViT and MiniLM accuracy.

    python -m graphopt.bench.integer_only speed   [--batch 8 --runs 15 --threads 2 --isa amx|vnni|portable]
    python -m graphopt.bench.integer_only minilm  [--sentences 256]
    python -m graphopt.bench.integer_only digits

speed: torch eager, ONNX Runtime fp32, ONNX Runtime quantize_dynamic int8 (QInt8 weights) and our
integer-only model (with and without calibration tricks) on two backends, ONNX Runtime (standard ONNX
integer ops) and cpu_integer (fused integer kernels), run side by side in one process, interleaved;
medians and ratios against each baseline; the time `optimize` itself takes; whether the two backends'
outputs are bit-identical.
minilm: all-MiniLM-L6-v2 mean-pooled embeddings, cosine against torch float, ours and
quantize_dynamic (dynamo export) on the same sentences padded to 64 tokens.
Results go to bench/results/integer_only_<what>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import graphopt
from graphopt import zoo
from graphopt.timing import interleaved

RESULTS = Path(__file__).resolve().parent / "results"


def _ort_session(path_or_model, threads):
    from graphopt.backends.onnxruntime_backend import create_session
    return create_session(path_or_model, threads=threads)


def quantize_dynamic_session(onnx_path: str, threads: int, per_channel: bool = False):
    """ONNX Runtime's own dynamic int8 quantization (QInt8 weights; its defaults unless per_channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = onnx_path.replace(".onnx", ".int8pc.onnx" if per_channel else ".int8.onnx")
    quantize_dynamic(onnx_path, out, weight_type=QuantType.QInt8, per_channel=per_channel)
    return _ort_session(out, threads)


def speed(args) -> dict:
    from graphopt.backends.onnx_lowering import to_onnx
    from graphopt.backends.onnxruntime_backend import write_model
    from graphopt.backends.cpu_integer_library import limit_isa
    from graphopt.backends.registry import lower

    torch.set_num_threads(args.threads)
    model = zoo.deit_small(args.batch).model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    calib = [(torch.randn(args.batch, 3, 224, 224, generator=g),) for _ in range(args.calib)]
    t0 = time.perf_counter()
    float_graph = graphopt.optimize(model, [], (x,)).graph
    capture_s = time.perf_counter() - t0
    # with the calibration tricks used for MiniLM (MSE clipping, SmoothQuant 0.7) and without (min/max)
    variants = {"int_only": {"smoothquant": 0.7}, "int_only_plain": {"method": "minmax"}}
    graphs, opt_s = {}, {}
    for name, opts in variants.items():
        t0 = time.perf_counter()
        graphs[name] = graphopt.optimize(float_graph, [("integer_only", opts)], (x,), calibration=calib).graph
        opt_s[name] = time.perf_counter() - t0
    tmp = tempfile.mkdtemp(prefix="graphopt-int-")
    fp32_path = os.path.join(tmp, "deit_fp32.onnx")
    write_model(to_onnx(float_graph), fp32_path)
    fp32 = _ort_session(fp32_path, args.threads)
    dyn = quantize_dynamic_session(fp32_path, args.threads)
    sessions = {name: _ort_session(to_onnx(gr), args.threads) for name, gr in graphs.items()}
    kernels = {name + "_cpu": lower(gr, "cpu_integer", threads=args.threads)
               for name, gr in graphs.items()}
    limit_isa(args.isa)
    feed = {fp32.get_inputs()[0].name: x.numpy()}

    def ort(sess):
        name = sess.get_inputs()[0].name
        return lambda: sess.run(None, {name: x.numpy()})

    fns = {"torch_eager": lambda: model(pixel_values=x), "ort_fp32": ort(fp32), "ort_dynamic_int8": ort(dyn)}
    fns.update({name: ort(s) for name, s in sessions.items()})
    fns.update({name: (lambda ex=ex: ex.run_flat(x)) for name, ex in kernels.items()})
    with torch.inference_mode():
        ref = model(pixel_values=x).logits
        med = {k: t.median * 1e3 for k, t in interleaved(fns, args.runs).items()}
    agree, outs = {}, {}
    for name, s in [("ort_fp32", fp32), ("ort_dynamic_int8", dyn)] + list(sessions.items()):
        outs[name] = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
    with torch.inference_mode():
        outs.update({name: ex.run_flat(x)[0] for name, ex in kernels.items()})
    for name, out in outs.items():
        agree[name] = float(torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0))
    identical = {name: torch.equal(outs[name], outs[name + "_cpu"]) for name in graphs}
    del feed
    result = {"what": "speed", "model": "DeiT-S-shaped ViT (HF, random weights)", "batch": args.batch,
              "threads": args.threads, "runs": args.runs, "median_ms": med,
              "ratios": {k: {"vs_" + b: med[b] / med[k] for b in ("torch_eager", "ort_fp32", "ort_dynamic_int8")}
                         for k in med},
              "optimize_seconds": opt_s, "capture_seconds": capture_s, "cosine_vs_torch": agree,
              "cpu_integer_identical_to_ort": identical, "cpu_integer_isas": _isas(), "isa_limit": args.isa,
              "fallback": {k: g.meta["integer_only"]["fallback"] for k, g in graphs.items()}}
    print(f"{'model':20s} {'median ms':>10s} {'vs eager':>9s} {'vs ORT fp32':>12s} {'vs ORT dyn int8':>16s} {'cos':>8s}")
    for k, v in med.items():
        r = result["ratios"][k]
        print(f"{k:20s} {v:10.1f} {r['vs_torch_eager']:9.2f} {r['vs_ort_fp32']:12.2f} {r['vs_ort_dynamic_int8']:16.2f} "
              f"{agree.get(k, 1.0):8.4f}")
    print("optimize seconds:", {k: round(v, 1) for k, v in opt_s.items()}, "capture:", round(capture_s, 1))
    print("cpu_integer output bit-identical to ONNX Runtime's:", identical, "GEMM ISAs:", _isas(), "limit:", args.isa)
    return result


def _isas() -> list[str]:
    from graphopt.backends.cpu_integer_library import available_isas
    return available_isas()


def minilm(args) -> dict:
    model, tok = zoo.minilm_model(add_pooling_layer=False), zoo.minilm_tokenizer()
    sentences = zoo.sentences(args.sentences)
    calib_sentences = zoo.sentences(args.sentences + 64)[-64:]
    enc = tok(sentences, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    cal = tok(calib_sentences, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    kw = lambda e, i, j: ((), {"input_ids": e["input_ids"][i:j], "attention_mask": e["attention_mask"][i:j]})
    calib = [kw(cal, i, i + 16) for i in range(0, 64, 16)]

    def embed(hidden, mask):
        m = mask.unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    with torch.no_grad():
        ref = embed(model(**kw(enc, 0, len(sentences))[1]).last_hidden_state, enc["attention_mask"])
    t0 = time.perf_counter()
    graph = graphopt.optimize(model, [], kw(enc, 0, 8)).graph
    results = {}
    configs = {"int_only": {}, "int_only_minmax": {"method": "minmax"}, "int_only_smoothquant": {"smoothquant": 0.5},
               "int_only_sq07": {"smoothquant": 0.7}, "int_only_sq07_pct": {"smoothquant": 0.7, "method": "percentile"}}
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    for name, opts in configs.items():
        t0 = time.perf_counter()
        om = graphopt.optimize(graph, [("integer_only", opts)], kw(enc, 0, 8), calibration=calib, backend="onnxruntime",
                               backend_options={"threads": 2})
        secs = time.perf_counter() - t0
        outs = []
        for i in range(0, len(sentences), 32):
            out = om(**kw(enc, i, i + 32)[1])
            outs.append(embed(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0], enc["attention_mask"][i:i + 32]))
        cos = torch.nn.functional.cosine_similarity(ref, torch.cat(outs), dim=-1)
        results[name] = {"mean_cos": cos.mean().item(), "min_cos": cos.min().item(), "optimize_seconds": secs,
                         "fallback": om.graph.meta["integer_only"]["fallback"]}
        print(name, results[name])
    for per_channel in (False, True):
        name = "ort_dynamic_int8" + ("_per_channel" if per_channel else "")
        results[name] = _minilm_dynamic(model, enc, kw, sentences, ref, embed, per_channel)
        print(name, results[name])
    return {"what": "minilm", "sentences": len(sentences), "max_length": 64, "results": results}


def _minilm_dynamic(model, enc, kw, sentences, ref, embed, per_channel):
    tmp = tempfile.mkdtemp(prefix="graphopt-minilm-")
    path = os.path.join(tmp, "minilm.onnx")
    ids, mask = enc["input_ids"][:2], enc["attention_mask"][:2]
    batch = torch.export.Dim("batch")
    torch.onnx.export(model, (), path, kwargs={"input_ids": ids, "attention_mask": mask}, dynamo=True,
                      dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}}, external_data=False)
    sess = quantize_dynamic_session(path, 2, per_channel)
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for i in range(0, len(sentences), 32):
        feed = {n: kw(enc, i, i + 32)[1][n].numpy() for n in names}
        outs.append(embed(torch.from_numpy(sess.run(None, feed)[0]), enc["attention_mask"][i:i + 32]))
    cos = torch.nn.functional.cosine_similarity(ref, torch.cat(outs), dim=-1)
    return {"mean_cos": cos.mean().item(), "min_cos": cos.min().item()}


def digits(args) -> dict:
    """Test accuracy of the digits ViT: float vs integer-only (reference backend and ONNX Runtime)."""
    from graphopt.backends.registry import lower
    case = zoo.digits_vit()
    calib = [(case.train_images[i:i + 64],) for i in range(0, 512, 64)]
    out = {"what": "digits", "float_accuracy": case.test_accuracy}
    for name, opts in {"int_only": {}, "int_only_minmax": {"method": "minmax"}, "int_only_sq07": {"smoothquant": 0.7}}.items():
        t0 = time.perf_counter()
        om = graphopt.optimize(case.model, [("integer_only", opts)], (case.test_images[:8],), calibration=calib)
        secs = time.perf_counter() - t0
        ort = lower(om.graph, "onnxruntime", threads=args.threads)
        ref_logits = om(case.test_images).logits
        ort_logits = ort.run_flat(case.test_images)[0]
        out[name] = {"accuracy_reference": case.accuracy(om), "accuracy_ort": case.accuracy(lambda x: ort.run_flat(x)[0]),
                     "ort_bit_identical": bool(torch.equal(ref_logits, ort_logits)), "optimize_seconds": secs,
                     "drop_points": 100 * (case.test_accuracy - case.accuracy(om))}
        print(name, out[name])
    print("float accuracy", case.test_accuracy)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "minilm", "digits"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", type=int, default=4, help="calibration batches (speed)")
    p.add_argument("--isa", choices=["amx", "vnni", "portable"], default="amx",
                   help="the most capable GEMM instruction set cpu_integer may use (speed; default: the best there is)")
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--only", default="", help="comma-separated configs (minilm)")
    args = p.parse_args(argv)
    result = {"speed": speed, "minilm": minilm, "digits": digits}[args.what](args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"integer_only_{args.what}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1:])
