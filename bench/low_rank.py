"""Low-rank benchmark: accuracy curves, digits accuracy, speed and fused-MLP peak memory.

    python bench/low_rank.py                       # everything (about 15-30 min on the 2-core machine)
    python bench/low_rank.py --only curve          # MiniLM cosine / kept-parameter curve
    python bench/low_rank.py --only digits         # digits ViT accuracy at 50% kept linear parameters
    python bench/low_rank.py --only speed          # dense vs factorised MiniLM (seq 128, batch 8), torch + ORT,
                                                   # 1 and 2 threads (--threads 1,2)
    python bench/low_rank.py --only memory         # fused vs unfused low-rank MLP peak memory by token count

Results go to bench/results/low_rank.json and bench/results/low_rank.html (matplotlib plot embedded).
Speed figures are medians of interleaved runs in one process; on a shared machine re-run them when
it is quiet. Nothing is downloaded (weights come from the installed packages via graphopt.zoo).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.backends.torch_backend import run  # noqa: E402
from graphopt.passes import PassManager  # noqa: E402
from graphopt.pipeline import calibration_batches  # noqa: E402
from graphopt.timing import interleaved  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5]
METHODS = {
    "plain SVD (uniform)": {"method": "svd"},
    "SVD-LLM (uniform)": {"method": "svd_llm"},
    "SVD-LLM allocated + sequential": {"method": "svd_llm", "allocation": "sensitivity", "sequential": True,
                                       "sensitivity_batches": 4},
}


# ---- MiniLM ---------------------------------------------------------------------------------------
class MiniLMEmbedder(torch.nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, masked mean pooling, L2 norm."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return zoo.minilm_embed(hidden, attention_mask)


_SUBJECTS = ["The old fisherman", "A young engineer", "My neighbour's cat", "The city council", "Our new teacher",
             "The orchestra", "A small startup", "The hospital staff", "Every student in the class",
             "The football team", "A tired traveller", "The bakery on the corner", "The research group",
             "My grandmother", "The software update", "A flock of geese", "The museum", "The pilot"]
_VERBS = ["repaired", "painted", "discussed", "ignored", "celebrated", "measured", "sold", "described",
          "photographed", "rebuilt", "studied", "delayed", "crossed", "cooked", "cancelled", "explained", "found"]
_OBJECTS = ["the broken bridge", "a detailed report on climate change", "the ancient map", "three loaves of bread",
            "the quarterly budget", "a strange noise in the attic", "the final exam results", "the mountain trail",
            "a new vaccine", "the leaking roof", "an unusual chess opening", "the village festival",
            "the neural network", "a cup of green tea", "a rare butterfly", "the train schedule", "the solar panels"]
_TAILS = ["yesterday morning", "before the sun went down", "despite the heavy rain", "for the third time this year",
          "with surprising enthusiasm", "while everyone else was asleep", "in less than an hour", "", "",
          "after a long argument", "because nobody else would", "at the end of the summer", "without any help"]
_ASK = ["How do I reset my password?", "Why is the sky blue?", "Is it going to rain tomorrow?",
        "Can you recommend a good book about history?", "How long does it take to learn the piano?",
        "Which programming language should I learn first?", "How many calories are in an apple?"]


def calibration_sentences(n: int, seed: int = 1) -> list[str]:
    """Calibration text from its own generator (other words and templates than the evaluation set's
    ``zoo.sentences``), so the curve measures generalisation, not memorisation of the eval sentences."""
    import random
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        k = rng.random()
        if k < 0.12:
            s = f"{rng.choice(_SUBJECTS)} asked: {rng.choice(_ASK).lower()}"
        elif k < 0.35:
            s = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}, and then "
                 f"{rng.choice(_SUBJECTS).lower()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}.")
        else:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}".strip() + "."
        s = " ".join(s.split())
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def token_batches(tokenizer, texts, batch):
    """Length-sorted batches (little padding) as kwargs dicts."""
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i])["input_ids"]))
    out = []
    for s in range(0, len(order), batch):
        enc = tokenizer([texts[i] for i in order[s:s + batch]], padding=True, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def minilm_graph():
    from torch.export import Dim
    from graphopt.frontends import from_torch

    model = MiniLMEmbedder(zoo.minilm_model()).eval()
    tok = zoo.minilm_tokenizer()
    seq = Dim("seq", min=2, max=512)
    shapes = {"input_ids": {0: Dim("batch"), 1: seq}, "attention_mask": {0: Dim("batch"), 1: seq}}
    example = token_batches(tok, ["A man is playing a guitar.", "The weather is lovely today."], 2)[0]
    return model, tok, from_torch(model, (), example, dynamic_shapes=shapes)


def curve(args) -> dict:
    model, tok, graph = minilm_graph()
    calib_texts, eval_texts = calibration_sentences(args.calib), zoo.sentences(args.eval)
    assert not set(calib_texts) & set(eval_texts)
    calib = calibration_batches(graph, [((), b) for b in token_batches(tok, calib_texts, 16)])
    evalb = calibration_batches(graph, [((), b) for b in token_batches(tok, eval_texts, 25)])
    reference = [run(graph, *b)[0] for b in evalb]

    def cosine(g):
        outs = [run(g, *b)[0] for b in evalb]
        return torch.cat([torch.nn.functional.cosine_similarity(a, r, dim=-1)
                          for a, r in zip(outs, reference)]).mean().item()

    result = {"calibration_sentences": len(calib_texts), "eval_sentences": len(eval_texts),
              "layers": "every linear layer of the encoder (36; the unused pooler excluded)",
              "ratios": RATIOS, "methods": {}, "notes": {}}
    sens_file = str(RESULTS / "minilm_sensitivity.json")
    for name, opts in METHODS.items():
        result["methods"][name] = []
        for ratio in RATIOS:
            spec = dict(opts, ratio=ratio, exclude=["*pooler*"])
            if opts.get("allocation") == "sensitivity":
                spec["sensitivity_file"] = sens_file
            start = time.perf_counter()
            out, report = PassManager([("low_rank", spec)], calibration=calib).run(graph)
            cos = cosine(out)
            kept = out.meta["low_rank_kept_fraction"]
            result["methods"][name].append({"ratio": ratio, "kept": kept, "cosine": cos,
                                            "seconds": time.perf_counter() - start})
            if ratio in (0.8, 0.5):
                result["notes"][f"{name} @ {ratio}"] = [n for n in report["low_rank"].notes
                                                       if "kept dense" in n or "WARNING" in n or "output on" in n]
            print(f"curve {name:34s} ratio {ratio:.2f} kept {kept:.3f} cosine {cos:.4f}", flush=True)
    return result


# ---- digits ViT -----------------------------------------------------------------------------------
DIGITS_METHODS = dict(METHODS, **{
    "SVD-LLM allocated + sequential + corrected": {"method": "svd_llm", "allocation": "sensitivity", "sequential": True,
                                                   "correct": True, "sensitivity_batches": 4}})


def digits(args) -> dict:
    """Test accuracy at 50% kept linear parameters; calibrated on training images only (the pass holds
    some of them out for its own quality estimate), evaluated on the held-out test split."""
    from graphopt.frontends import from_torch

    case = zoo.digits_vit()
    graph = from_torch(case.model, (), case.kwargs)
    imgs = case.train_images[:args.digits_calib]
    calib = [(imgs[i:i + 64],) for i in range(0, len(imgs), 64)]

    def acc(g):
        return case.accuracy(lambda x: run(g, x)[0])

    out = {"dense_accuracy": acc(graph), "zoo_reported": case.test_accuracy, "test_images": len(case.test_images),
           "calibration_images": len(imgs), "results": []}
    print(f"digits dense accuracy {out['dense_accuracy']:.4f} ({len(case.test_images)} test images, calibration on "
          f"{len(imgs)} training images)", flush=True)
    for name, opts in DIGITS_METHODS.items():
        g, report = PassManager([("low_rank", dict(opts, ratio=0.5))], calibration=calib).run(graph)
        row = {"method": name, "kept": g.meta["low_rank_kept_fraction"], "accuracy": acc(g),
               "held_out_cosine": g.meta.get("low_rank_output_cosine")}  # None: plain SVD uses no calibration
        out["results"].append(row)
        print(f"digits {name:44s} kept {row['kept']:.3f} accuracy {row['accuracy']:.4f} "
              f"({(row['accuracy'] - out['dense_accuracy']) * 100:+.2f} points)", flush=True)
    return out


# ---- speed ----------------------------------------------------------------------------------------
SPEED_PAIRS = {"torch": ("torch dense", "torch low-rank 50%"),
               "onnxruntime": ("onnxruntime dense", "onnxruntime low-rank 50%"),
               "torch fused MLP": ("torch dense", "torch low-rank 50% + fused MLP")}


def speed(args) -> dict:
    """Dense vs 50%-kept MiniLM at each thread count, in one process, each backend's variants
    interleaved. The ratio is the median over repetitions of (dense time / factorised time) within one
    repetition, so load drift on a shared machine hits both sides of each ratio alike."""
    model = zoo.minilm_model()  # the BertModel (ONNX has no lowering for the embedder's F.normalize)
    tok = zoo.minilm_tokenizer()
    texts = zoo.sentences(8)
    enc = tok(texts, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    factorise = [("low_rank", {"method": "svd", "ratio": 0.5, "exclude": ["*pooler*"]})]
    from graphopt.frontends import from_torch
    graph = from_torch(model, (), inputs)  # captured once; optimize() clones it for every variant
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    out = {"shape": "batch 8, sequence 128, MiniLM-L6 (384 wide, 6 layers)", "reps": args.reps,
           "ratio": "median over repetitions of dense/factorised time within a repetition", "threads": {}}
    for threads in [int(t) for t in str(args.threads).split(",")]:
        torch.set_num_threads(threads)
        variants = {}
        for backend in ("torch", "onnxruntime"):
            opts = {"threads": threads} if backend == "onnxruntime" else None
            variants[f"{backend} dense"] = graphopt.optimize(graph, [], inputs, backend=backend, backend_options=opts)
            variants[f"{backend} low-rank 50%"] = graphopt.optimize(graph, factorise, inputs, backend=backend,
                                                                    backend_options=opts)
        variants["torch low-rank 50% + fused MLP"] = graphopt.optimize(graph, factorise + ["fuse_low_rank"], inputs)
        with torch.no_grad():
            for k, v in variants.items():  # warm up + check the dense ones reproduce the model
                got = v(**inputs)
                hidden = got["last_hidden_state"] if isinstance(got, dict) else got[0]
                if "dense" in k:
                    torch.testing.assert_close(hidden, ref, atol=1e-3, rtol=1e-3)
            times = {}
            for backend in ("torch", "onnxruntime"):  # one backend at a time: the other's threads must not spin
                group = {k: (lambda v=v: v(**inputs)) for k, v in variants.items() if k.startswith(backend)}
                times.update({k: t.times for k, t in interleaved(group, args.reps).items()})
        med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        ratios = {name: statistics.median(d / f for d, f in zip(times[dense], times[fact]))
                  for name, (dense, fact) in SPEED_PAIRS.items()}
        out["threads"][str(threads)] = {"median_ms": med, "speedup": ratios}
        for k, v in med.items():
            print(f"speed {threads} thread(s) {k:32s} {v:8.1f} ms", flush=True)
    print("speed-up of the 50%-kept model over the dense one (target >= 1.4x):", flush=True)
    for threads, row in out["threads"].items():
        print(f"  {threads} thread(s): " + "  ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items()), flush=True)
    return out


# ---- peak memory of the fused MLP ----------------------------------------------------------------
_MEM_CHILD = r"""
import os, sys, threading, time, torch
from graphopt.ir.ops.low_rank import tiled_mlp, unfused_mlp
mode, rows = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
n, h, r1, r2 = 384, 1536, 153, 153
g = torch.Generator().manual_seed(0)
f = [torch.randn(*s, generator=g) * 0.05 for s in [(r1, n), (h, r1), (h,), (r2, h), (n, r2), (n,)]]
x = torch.randn(rows, n, generator=g)
small = torch.randn(64, n)
(tiled_mlp if mode == "fused" else unfused_mlp)(small, *f, "gelu")   # warm up allocator / kernels
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
base, peak, done = rss(), [0], threading.Event()
def sample():   # the import-time high-water mark hides ru_maxrss growth, so sample the resident size
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0002)
th = threading.Thread(target=sample)
th.start()
t = time.perf_counter()
y = tiled_mlp(x, *f, "gelu", 256) if mode == "fused" else unfused_mlp(x, *f, "gelu")
dt = time.perf_counter() - t
done.set()
th.join()
print(max(peak[0], rss()) - base, dt)
"""


def memory(args) -> dict:
    rows_list = [2048, 8192, 32768, 131072]
    out = {"shape": "MiniLM MLP 384 -> 1536 -> 384 at 50% kept (ranks 153/153), gelu, tile 256, fp32",
           "method": "peak resident-set growth of a fresh process during one call (sampled every 0.2 ms)", "rows": []}
    from graphopt.ir.ops.low_rank import peak_hidden_elements
    for rows in rows_list:
        row = {"tokens": rows}
        for mode in ("unfused", "fused"):
            res = subprocess.run([sys.executable, "-c", _MEM_CHILD, mode, str(rows)], capture_output=True, text=True,
                                 check=True)
            peak, seconds = res.stdout.split()
            row[f"{mode}_peak_mib"] = int(peak) / 2 ** 20
            row[f"{mode}_ms"] = float(seconds) * 1e3
            row[f"{mode}_model_mib"] = peak_hidden_elements(rows, 1536, 153, 153, 256, mode == "fused") * 4 / 2 ** 20
        row["output_mib"] = rows * 384 * 4 / 2 ** 20
        out["rows"].append(row)
        print(f"memory tokens {rows:7d}: unfused +{row['unfused_peak_mib']:.1f} MiB ({row['unfused_ms']:.0f} ms), "
              f"fused +{row['fused_peak_mib']:.1f} MiB ({row['fused_ms']:.0f} ms); output {row['output_mib']:.1f} MiB",
              flush=True)
    return out


# ---- report ---------------------------------------------------------------------------------------
def html(results: dict) -> str:
    parts = ["<html><head><meta charset='utf-8'><title>graphopt low-rank benchmark</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
             "<h1>Low-rank factorisation: graphopt.passes.low_rank</h1>",
             f"<p>Machine: {os.cpu_count()} CPU cores; shared with other jobs (timings are noisy; re-run on a quiet "
             "machine with <code>python bench/low_rank.py --only speed</code>).</p>"]
    if "curve" in results:
        c = results["curve"]
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rows in c["methods"].items():
            ax.plot([r["kept"] * 100 for r in rows], [r["cosine"] for r in rows], marker="o", label=name)
        ax.set_xlabel("kept parameters of the encoder's linear layers (%)")
        ax.set_ylabel(f"mean embedding cosine vs dense ({c['eval_sentences']} sentences)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("all-MiniLM-L6-v2")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        (RESULTS / "low_rank_minilm.png").write_bytes(buf.getvalue())
        parts.append("<h2>all-MiniLM-L6-v2: embedding cosine vs kept parameters</h2>")
        parts.append(f"<p>{c['layers']}; calibration on {c['calibration_sentences']} generated sentences (own templates), "
                     f"evaluation on {c['eval_sentences']} different sentences (graphopt.zoo.sentences: hand-written + "
                     "templated).</p>")
        parts.append(f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>")
        names = list(c["methods"])
        parts.append("<table><tr><th>target kept</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>")
        for i, ratio in enumerate(c["ratios"]):
            parts.append(f"<tr><td>{ratio:.0%}</td>" + "".join(
                f"<td>{c['methods'][n][i]['cosine']:.4f} ({c['methods'][n][i]['kept']:.1%})</td>" for n in names)
                + "</tr>")
        parts.append("</table>")
        worst = c["methods"][names[-1]][-1]["cosine"]
        parts.append(f"<p><b>Honestly:</b> MiniLM is small and distilled, with little redundancy in its square "
                     f"384x384 projections (a factorisation only saves parameters below rank 192). Even the best "
                     f"method reaches cosine {worst:.3f} at 50% kept parameters: usable for coarse retrieval at best; "
                     f"fine-tuning after factorising (not done here) would be needed for more.</p>")
    if "digits" in results:
        d = results["digits"]
        parts.append("<h2>Digits ViT: test accuracy at 50% kept linear parameters</h2>")
        parts.append(f"<p>Dense accuracy {d['dense_accuracy']:.2%} on {d['test_images']} test images; calibration "
                     f"on {d['calibration_images']} training images.</p><table><tr><th>method</th><th>kept</th>"
                     "<th>accuracy</th><th>change (points)</th></tr>")
        for r in d["results"]:
            parts.append(f"<tr><td>{r['method']}</td><td>{r['kept']:.1%}</td><td>{r['accuracy']:.2%}</td>"
                         f"<td>{(r['accuracy'] - d['dense_accuracy']) * 100:+.2f}</td></tr>")
        parts.append("</table>")
    if "speed" in results:
        s = results["speed"]
        parts.append(f"<h2>Speed ({s['shape']}, {s['reps']} interleaved runs per variant)</h2>"
                     f"<p>Speed-up: {s['ratio']}.</p><table><tr><th>threads</th><th>variant</th><th>ms</th></tr>")
        for threads, row in s["threads"].items():
            for k, v in row["median_ms"].items():
                parts.append(f"<tr><td>{threads}</td><td>{k}</td><td>{v:.1f}</td></tr>")
        parts.append("</table><ul>" + "".join(
            f"<li>{threads} thread(s): " + ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items()) + "</li>"
            for threads, row in s["threads"].items()) + "</ul>")
    if "memory" in results:
        m = results["memory"]
        parts.append(f"<h2>Peak memory: fused vs unfused low-rank MLP</h2><p>{m['shape']}; {m['method']}.</p>"
                     "<table><tr><th>tokens</th><th>unfused MiB</th><th>fused MiB</th><th>saved</th>"
                     "<th>unfused ms</th><th>fused ms</th></tr>")
        for r in m["rows"]:
            saved = 1 - r["fused_peak_mib"] / r["unfused_peak_mib"] if r["unfused_peak_mib"] > 0 else float("nan")
            parts.append(f"<tr><td>{r['tokens']}</td><td>{r['unfused_peak_mib']:.1f}</td><td>{r['fused_peak_mib']:.1f}"
                         f"</td><td>{saved:.0%}</td><td>{r['unfused_ms']:.0f}</td><td>{r['fused_ms']:.0f}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="curve,digits,speed,memory")
    p.add_argument("--calib", type=int, default=192, help="calibration sentences")
    p.add_argument("--eval", type=int, default=200, help="evaluation sentences (disjoint from calibration)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--digits-calib", type=int, default=None,
                   help="training images used to calibrate the digits ViT (default: all of them)")
    p.add_argument("--threads", default="1,2", help="thread counts for the speed part (comma-separated)")
    p.add_argument("--calib-threads", type=int, default=1,
                   help="torch threads during calibration (1 avoids OpenMP spin-waits on a busy machine)")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "low_rank.json"
    results = {}
    for part in args.only.split(","):
        torch.set_num_threads(args.calib_threads)  # speed sets its own thread counts
        value = {"curve": curve, "digits": digits, "speed": speed, "memory": memory}[part](args)
        results = json.loads(path.read_text()) if path.exists() else {}   # other parts may run in parallel
        results[part] = value
        path.write_text(json.dumps(results, indent=1))
    (RESULTS / "low_rank.html").write_text(html(results))
    print(f"wrote {path} and {RESULTS / 'low_rank.html'}")


if __name__ == "__main__":
    main()
