"""Integer-only transformers (issues 5, 18): speed against the CPU stacks a user would pick instead,
slowdown under load, MiniLM and digits accuracy.

    python -m graphopt.bench.integer_only speed  [--model deit|minilm --batch 8 --seq 128 --runs 10 --threads 2
                                                  --calib-samples 32 --isa amx|vnni|portable]
    python -m graphopt.bench.integer_only speed --batch 1                      # DeiT-S batch-1 latency
    python -m graphopt.bench.integer_only speed --ort-paths    # + ours in ONNX Runtime: standard ops, custom ops
    python -m graphopt.bench.integer_only speed --model minilm --batch 8 --seq 128
    python -m graphopt.bench.integer_only load   [--model deit --batch 8 --runs 5]
    python -m graphopt.bench.integer_only minilm [--sentences 256]
    python -m graphopt.bench.integer_only digits

speed: ours (`integer_only`, and for the ViT `integer_only` then `narrow_rows` (the last block on the CLS token
the classifier reads; the same output integers, checked) and `token_merge` r=16 then `integer_only`, for MiniLM
`integer_only` then `zero_padded_positions` (outputs 0 at padding, so only real tokens are computed), on cpu_integer)
beside torch eager, ONNX Runtime fp32 / dynamic int8 / static int8 (QDQ, per-channel) and OpenVINO
fp32 / bf16 / int8 (NNCF post-training quantization), all in one process, interleaved, the same
thread count (OpenVINO with PERFORMANCE_HINT=LATENCY: one synchronous call per batch, see
bench/peers.py); every quantizer calibrates on the same batches. Prints medians, each candidate's
speed ratio against every baseline, and its agreement with torch float on the benchmark input
(cosine; argmax agreement for logits, masked-mean embedding cosine for MiniLM), the CPU's instruction
sets, the load average; checks cpu_integer is bit-identical to the integer graph on ONNX Runtime.
MiniLM rows are 1..8 sentences joined, padded to --seq: real lengths vary under the attention mask.
load: ours and OpenVINO timed alone, then beside a process running a torch matmul loop on 1 and
on 2 threads (bench/under_load.py); each one's slowdown against its own unloaded time in that run, and
the cores this process and the load process got during each one's calls (the scheduler's split).
speed also gives, for ours, openvino_int8's time / ours per interleaved round (median, 10th and 90th
percentile): how far one run's ratio moves on a shared machine.
minilm: all-MiniLM-L6-v2 mean-pooled embeddings, cosine against torch float, ours and
quantize_dynamic (dynamo export) on the same sentences padded to 64 tokens.
digits: the digits ViT's test accuracy, float and integer-only, with and without token_merge r=16.
OpenVINO and NNCF come with the optional extra: pip install -e '.[bench]'.
Results go to bench/results/integer_only_<what>[_<model>_b<batch>].json (git-ignored).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import graphopt
from graphopt import zoo
from graphopt.bench.compare import agreement, paired_ratios, ratios, slowdown
from graphopt.bench.models import primary_output
from graphopt.timing import interleaved

RESULTS = Path(__file__).resolve().parent / "results"


def _ort_session(path_or_model, threads):
    from graphopt.backends.onnxruntime_backend import create_session
    return create_session(path_or_model, threads=threads)


def quantize_dynamic_path(onnx_path: str, per_channel: bool = False) -> str:
    """ONNX Runtime's own dynamic int8 quantization (QInt8 weights; its defaults unless per_channel): the file written."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = onnx_path.replace(".onnx", ".int8pc.onnx" if per_channel else ".int8.onnx")
    quantize_dynamic(onnx_path, out, weight_type=QuantType.QInt8, per_channel=per_channel)
    return out


def quantize_dynamic_session(onnx_path: str, threads: int, per_channel: bool = False):
    return _ort_session(quantize_dynamic_path(onnx_path, per_channel), threads)


BASELINES = ["openvino_int8", "openvino_fp32", "ort_static_int8", "ort_dynamic_int8", "torch_eager"]
PEERS = ["torch_eager", "ort_fp32", "ort_dynamic_int8", "ort_static_int8", "openvino_fp32", "openvino_bf16", "openvino_int8"]


@dataclass
class Bench:
    """A benchmark model: its torch module, the timed input, the calibration batches every quantizer
    gets (ours, NNCF, ORT static), the attention mask for the accuracy check, our pass lists."""
    description: str
    model: torch.nn.Module
    feed: dict[str, torch.Tensor]
    calibration: list[dict[str, torch.Tensor]]
    mask: torch.Tensor | None
    ours: dict[str, list]


def deit_bench(args) -> Bench:
    """DeiT-S-shaped HF ViT, random weights, random images; ours with and without token_merge r=16."""
    model = zoo.deit_small(args.batch).model
    g = torch.Generator().manual_seed(0)
    images = lambda: {"pixel_values": torch.randn(args.batch, 3, 224, 224, generator=g)}
    integer = ("integer_only", {"smoothquant": 0.7})
    return Bench("DeiT-S-shaped ViT (HF, random weights)", model, images(),
                 [images() for _ in range(-(-args.calib_samples // args.batch))], None,
                 {"int_only": [integer], "int_only+narrow_rows": [integer, "narrow_rows"],
                  "int_only+tm16": [("token_merge", {"r": 16}), integer]})


def minilm_bench(args) -> Bench:
    """all-MiniLM-L6-v2 (real weights), each row 1..8 consecutive sentences joined, so real lengths
    vary from a few tokens to the full ``--seq`` and the rest is padding under the attention mask."""
    model, tok = zoo.minilm_model(add_pooling_layer=False), zoo.minilm_tokenizer()
    n_calib = -(-args.calib_samples // args.batch)
    n_rows = args.batch * (1 + n_calib)
    pool = zoo.sentences(sum(1 + i % 8 for i in range(n_rows)))
    texts, at = [], 0
    for i in range(n_rows):
        texts.append(" ".join(pool[at:at + 1 + i % 8]))
        at += 1 + i % 8
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
    rows = lambda i: {k: enc[k][i * args.batch:(i + 1) * args.batch] for k in ("input_ids", "attention_mask")}
    return Bench(f"all-MiniLM-L6-v2 (real weights), seq {args.seq} padded", model, rows(0),
                 [rows(i) for i in range(1, 1 + n_calib)], rows(0)["attention_mask"],
                 {"int_only": [("integer_only", {"smoothquant": 0.7})],
                  # padding's outputs 0 (the peers compute them): cpu_integer computes only the real tokens
                  "int_only+zero_padding": [("integer_only", {"smoothquant": 0.7}), "zero_padded_positions"]})


def candidates(bench: Bench, args, peers=PEERS) -> tuple[dict, dict]:
    """``name -> call()`` returning the first output as numpy, for ours on cpu_integer and each of
    ``peers``; and what was measured while building them (optimize time, kernel reports, bit-identity)."""
    from graphopt.backends.onnx import to_onnx
    from graphopt.backends.onnx.cpu_integer_ops import to_onnx_custom_ops
    from graphopt.backends.onnxruntime_backend import write_model
    from graphopt.backends.cpu_integer_library import limit_isa
    from graphopt.backends.registry import lower
    from graphopt.bench import peers as P

    model, feed = bench.model, bench.feed
    np_feed = {k: v.numpy() for k, v in feed.items()}
    np_calib = [{k: v.numpy() for k, v in c.items()} for c in bench.calibration]
    info = {"optimize_seconds": {}, "kernel_report": {}, "cpu_integer_identical_to_ort": {}}
    t0 = time.perf_counter()
    float_graph = graphopt.optimize(model, [], ((), feed)).graph
    info["capture_seconds"] = time.perf_counter() - t0
    calls = {}
    for name, passes in bench.ours.items():
        t0 = time.perf_counter()
        graph = graphopt.optimize(float_graph, passes, ((), feed), calibration=[((), c) for c in bench.calibration]).graph
        info["optimize_seconds"][name] = time.perf_counter() - t0
        ex = lower(graph, "cpu_integer", threads=args.threads)
        info["kernel_report"][name] = str(ex.report)
        calls[name] = lambda ex=ex: primary_output(ex(**feed)).numpy()
        ort = lower(graph, "onnxruntime", threads=args.threads)
        with torch.inference_mode():
            info["cpu_integer_identical_to_ort"][name] = bool(torch.equal(primary_output(ex(**feed)), ort.run_flat(*feed.values())[0]))
        if args.ort_paths:   # what opt-cli users run: the standard-op ONNX, and --ort-custom-ops
            calls[name + "_ort_standard_ops"] = lambda o=ort: o.run_flat(*feed.values())[0].numpy()
            custom = P.ort_custom_ops_call(to_onnx_custom_ops(graph, threads=args.threads), args.threads)
            calls[name + "_ort_custom_ops"] = lambda c=custom: c(np_feed)
    limit_isa(args.isa)
    fp32_path = P.temp_path("fp32.onnx")
    if {"ort_fp32", "ort_dynamic_int8", "ort_static_int8"} & set(peers):
        write_model(to_onnx(float_graph), fp32_path)
    builders = {"torch_eager": lambda: (lambda: primary_output(model(**feed)).numpy()),
                "ort_fp32": lambda: P.ort_call(fp32_path, args.threads),
                "ort_dynamic_int8": lambda: P.ort_call(quantize_dynamic_path(fp32_path), args.threads),
                "ort_static_int8": lambda: P.ort_static_int8(fp32_path, np_calib, args.threads)}
    for name in peers:
        if name in builders:
            t0 = time.perf_counter()
            built = builders[name]()
            info["optimize_seconds"][name] = time.perf_counter() - t0
            calls[name] = built if name == "torch_eager" else (lambda c=built: c(np_feed))
    if any(p.startswith("openvino") for p in peers):
        t0 = time.perf_counter()
        for name, c in P.openvino_runners(model, np_feed, np_calib, args.threads).items():
            if name in peers:
                calls[name] = lambda c=c: c(np_feed)
                info.setdefault("openvino_inference_precision", {})[name] = c.precision
        info["optimize_seconds"]["openvino (convert + nncf.quantize + compile)"] = time.perf_counter() - t0
    return calls, info


def timed(calls: dict, runs: int) -> dict[str, float]:
    """Median milliseconds of each call, interleaved in one process, without autograd."""
    return {k: statistics.median(t) * 1e3 for k, t in timed_rounds(calls, runs).items()}


def timed_rounds(calls: dict, runs: int) -> dict[str, list[float]]:
    """Seconds of each call per interleaved round (round order), without autograd."""
    with torch.inference_mode():
        return {k: t.times for k, t in interleaved(calls, runs).items()}


def speed(args) -> dict:
    torch.set_num_threads(args.threads)
    bench = (minilm_bench if args.model == "minilm" else deit_bench)(args)
    calls, info = candidates(bench, args)
    rounds = timed_rounds(calls, args.runs)
    med = {k: statistics.median(t) * 1e3 for k, t in rounds.items()}
    with torch.inference_mode():
        ref = primary_output(bench.model(**bench.feed)).numpy()
        acc = {k: agreement(ref, c(), bench.mask) for k, c in calls.items()}
        if "int_only+narrow_rows" in calls:
            info["narrow_rows_identical_to_int_only"] = bool((calls["int_only+narrow_rows"]() == calls["int_only"]()).all())
    result = {"what": "speed", "model": bench.description, "batch": args.batch, "threads": args.threads,
              "runs": args.runs, "openvino_config": "INFERENCE_NUM_THREADS=threads, PERFORMANCE_HINT=LATENCY",
              "median_ms": med, "ratios": ratios(med, BASELINES), "accuracy_vs_torch_float": acc,
              "per_round_vs_openvino_int8": paired_ratios(rounds, "openvino_int8") if "openvino_int8" in rounds else {},
              "cpu": cpu(), "isa_limit": args.isa, "load_average": os.getloadavg(),
              "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")} | info
    if args.model == "minilm":
        result["seq"], result["real_lengths"] = args.seq, bench.mask.sum(1).tolist()
    print_table(result)
    return result


def load(args) -> dict:
    """Ours and OpenVINO timed unloaded, then beside a process busy on 1 and on 2 threads."""
    from graphopt.bench.under_load import CoreShares, busy_cores

    torch.set_num_threads(args.threads)
    bench = (minilm_bench if args.model == "minilm" else deit_bench)(args)
    calls, info = candidates(bench, args, peers=["openvino_int8", "openvino_fp32"])
    levels, cores = {}, {}
    for busy in (0, 1, 2):
        with busy_cores(busy) if busy else contextlib.nullcontext() as child:
            shares = CoreShares(child.pid if child else None) if Path("/proc").is_dir() else None
            levels[busy] = timed({k: shares.wrap(k, c) for k, c in calls.items()} if shares else calls, args.runs)
        print(f"busy threads {busy}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in levels[busy].items()), flush=True)
        if shares:
            cores[f"busy_{busy}"] = shares.cores()
            print("  cores during its calls (this process / the load process): " + ", ".join(
                f"{k} {c['this_process']:.2f} / {c['load_process']:.2f}" for k, c in cores[f"busy_{busy}"].items()), flush=True)
    result = {"what": "load", "model": bench.description, "batch": args.batch, "threads": args.threads, "runs": args.runs,
              "median_ms": {f"busy_{b}": m for b, m in levels.items()},
              "slowdown": {f"busy_{b}": slowdown(levels[0], levels[b]) for b in (1, 2)}, "cores_used": cores,
              "ours_vs_openvino_int8": {f"busy_{b}": ratios(m, ["openvino_int8"]) for b, m in levels.items()},
              "cpu": cpu(), "load_average": os.getloadavg(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")} | info
    print(f"{'':16s}" + "".join(f"{'slowdown ' + str(b) + ' busy':>18s}" for b in (1, 2)))
    for k in calls:
        print(f"{k:16s}" + "".join(f"{result['slowdown'][f'busy_{b}'][k]:18.2f}" for b in (1, 2)))
    return result


def print_table(result: dict) -> None:
    cpu_ = result["cpu"]
    print(f"\n{result['model']}, batch {result['batch']}, {result['threads']} threads, medians of {result['runs']} "
          f"interleaved runs; CPU {cpu_['model']} ({', '.join(cpu_['flags'])}; cpu_integer GEMM ISAs "
          f"{', '.join(cpu_['cpu_integer_isas'])}); load average {result['load_average'][0]:.1f}")
    cols = [b for b in BASELINES if b in result["median_ms"]]
    short = lambda b: b.replace("openvino", "ov").replace("_dynamic", "_dyn").replace("_static", "_st").replace("_eager", "")
    print(f"{'':22s} {'ms':>8s}" + "".join(f" {'vs ' + short(b):>13s}" for b in cols) + f" {'cos':>7s} {'agree':>6s}")
    for k, v in result["median_ms"].items():
        a = result["accuracy_vs_torch_float"][k]
        agree = a.get("argmax_agreement", a.get("embedding_cosine_min"))
        print(f"{k:22s} {v:8.1f}" + "".join(f" {result['ratios'][k]['vs_' + b]:13.2f}" for b in cols)
              + f" {a.get('cosine_real_tokens', a['cosine']):7.4f} {agree:6.3f}")
    print("agree: argmax agreement with torch float" if "argmax_agreement" in a else
          "cos: over the real tokens; agree: min over sentences of the masked-mean embedding cosine with torch float")
    if result["per_round_vs_openvino_int8"]:
        print("ov_int8 / candidate per interleaved round, median [10th, 90th percentile]: " + ", ".join(
            f"{k} {r['median']:.2f} [{r['p10']:.2f}, {r['p90']:.2f}]" for k, r in result["per_round_vs_openvino_int8"].items()
            if not k.startswith(("ort_", "openvino", "torch"))))
    print("cpu_integer bit-identical to the integer graph on ONNX Runtime:", result["cpu_integer_identical_to_ort"])
    if "narrow_rows_identical_to_int_only" in result:
        print("int_only+narrow_rows bit-identical to int_only:", result["narrow_rows_identical_to_int_only"])


def cpu() -> dict:
    """The CPU's model name and the instruction sets that matter here, and what cpu_integer's GEMM can use."""
    from graphopt.backends.cpu_integer_library import available_isas

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "unknown")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    return {"model": model, "flags": [f for f in wanted if f in flags], "cpu_integer_isas": available_isas(),
            "cores": os.cpu_count()}


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
    with tempfile.TemporaryDirectory(prefix="graphopt-minilm-") as tmp:
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
    """Test accuracy of the digits ViT: float, float token_merge r=16, and integer-only with and
    without token_merge r=16 (reference ops, ONNX Runtime and cpu_integer), drop in points vs float."""
    from graphopt.backends.registry import lower
    case = zoo.digits_vit()
    calib = [(case.train_images[i:i + 64],) for i in range(0, 512, 64)]
    example = (case.test_images[:8],)
    float_tm16 = case.accuracy(graphopt.optimize(case.model, [("token_merge", {"r": 16})], example))
    out = {"what": "digits", "float_accuracy": case.test_accuracy, "float_token_merge_r16_accuracy": float_tm16}
    tm16 = ("token_merge", {"r": 16})
    variants = {"int_only": [("integer_only", {})], "int_only_minmax": [("integer_only", {"method": "minmax"})],
                "int_only_sq07": [("integer_only", {"smoothquant": 0.7})],
                "int_only+tm16": [tm16, ("integer_only", {})], "int_only_sq07+tm16": [tm16, ("integer_only", {"smoothquant": 0.7})]}
    for name, passes in variants.items():
        t0 = time.perf_counter()
        om = graphopt.optimize(case.model, passes, example, calibration=calib)
        secs = time.perf_counter() - t0
        ort = lower(om.graph, "onnxruntime", threads=args.threads)
        cpu_int = lower(om.graph, "cpu_integer", threads=args.threads)
        ref_logits = om(case.test_images).logits
        ort_logits = ort.run_flat(case.test_images)[0]
        acc = case.accuracy(om)
        out[name] = {"accuracy_reference": acc, "accuracy_ort": case.accuracy(lambda x: ort.run_flat(x)[0]),
                     "accuracy_cpu_integer": case.accuracy(cpu_int),
                     "ort_bit_identical": bool(torch.equal(ref_logits, ort_logits)),
                     "cpu_integer_bit_identical": bool(torch.equal(ref_logits, primary_output(cpu_int(case.test_images)))),
                     "optimize_seconds": secs, "drop_points": 100 * (case.test_accuracy - acc)}
        print(name, out[name], flush=True)
    print("float accuracy", case.test_accuracy, "float token_merge r=16", float_tm16)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "load", "minilm", "digits"])
    p.add_argument("--model", choices=["deit", "minilm"], default="deit", help="speed, load: DeiT-S-shaped ViT or MiniLM")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="MiniLM: tokens per row, padded (speed, load)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-samples", type=int, default=32,
                   help="calibration samples (speed, load), in batches of --batch; the same for ours, NNCF and ORT static")
    p.add_argument("--isa", choices=["amx", "vnni", "portable"], default="amx",
                   help="the most capable GEMM instruction set cpu_integer may use (speed; default: the best there is)")
    p.add_argument("--ort-paths", action="store_true",
                   help="speed: also time our integer graphs in ONNX Runtime, as standard ops and with graphopt's "
                        "custom-op library (opt-cli's two outputs; the library always uses the best ISA)")
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--only", default="", help="comma-separated configs (minilm)")
    args = p.parse_args(argv)
    result = {"speed": speed, "load": load, "minilm": minilm, "digits": digits}[args.what](args)
    RESULTS.mkdir(exist_ok=True)
    tag = f"_{args.model}_b{args.batch}" if args.what in ("speed", "load") else ""
    out = RESULTS / f"integer_only_{args.what}{tag}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1:])
