"""Sparse benchmark (issue 17): SpMM kernels against dense GEMMs, pruning quality, structured speed.

    python bench/sparse.py                    # everything (about 10-20 min on a busy 2-core machine)
    python bench/sparse.py --only kernel      # SpMM vs dense on the DeiT-S MLP shapes, 2 threads, break-even
    python bench/sparse.py --only minilm      # all-MiniLM-L6-v2 (real weights) embedding cosine per criterion
    python bench/sparse.py --only minilm --calib-corpus mix --calib 512 --refit-calib 0   # every row on bench/corpus.py
    python bench/sparse.py --only minilm --refit-only --refit-calib 2048 --refit-allocation sensitivity \
        --refit-target residual     # the best MiniLM row alone: 0.9515 (min 0.837), ~16 min on 2 cores

MiniLM calibrates on 128 templated sentences (``--calib``, ``--calib-corpus``), except one Wanda refit row on 512
sentences of ``bench/corpus.py``'s mix (stdlib docstrings + templated; ``--refit-calib``, ``--refit-corpus``); the
evaluation is always the 100 held-out ``zoo.sentences``, which ``bench/corpus.py`` asserts it never contains.
    python bench/sparse.py --only digits      # digits ViT accuracy vs speed, structured pruning
    python bench/sparse.py --only deit        # DeiT-S-shaped ViT, batch 8, end to end on the torch backend
    python bench/sparse.py --only int8        # DeiT-S batch 8 on cpu_integer: integer_only vs + 1x4-block fc2

Kernel table (2 threads, Xeon with AMX, quieter machine, Dec 2026), ms at 50/70/80/90/95%: 1576x384->1536 dense
fp32 4.4, C CSR 6.7/3.8/2.7/1.6/1.2; int8 dense (``dense_int8_vnni``: the cpu_integer GEMM, AMX here) 0.4-0.55,
int8 1x4 SpMM 2.4/2.9/2.6/2.4/2.6; 1576x1536->384 dense fp32 4.5, C CSR 7.6/4.9/3.6/2.2/1.5; int8 dense 0.4-0.55,
int8 1x4 SpMM 2.3/1.3/1.1/0.75/0.59. fp32 CSR breaks even at 70% / 80%; the int8 SpMM never beats AMX.

Results go to bench/results/sparse.json. Times are medians of interleaved rounds in one process
(``graphopt.timing.interleaved``, ``--repeats`` rounds); on a shared machine they are noise: re-run when it is quiet. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from graphopt import zoo  # noqa: E402
from graphopt.backends import cpu_integer_library as ilib  # noqa: E402
from graphopt.backends import cpu_sparse_library as slib  # noqa: E402
from graphopt.backends.torch_backend import TorchExecutable, run  # noqa: E402
from graphopt.ir.ops.sparse import to_block1x4, to_csr  # noqa: E402
from graphopt.passes import PassManager  # noqa: E402
from graphopt.timing import interleaved  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
SHAPES = [(1576, 384, 1536), (1576, 1536, 384)]       # rows, in, out: DeiT-S MLP fc1 and fc2 at batch 8


def best_ms(fns: dict, repeats: int) -> dict:
    """Median ms of each callable, timed by graphopt.timing.interleaved (the project's one policy)."""
    return {k: 1e3 * t.median for k, t in interleaved(fns, runs=repeats).items()}


def _break_even(rows: list[dict], sparse_key: str, dense_key: str) -> float | None:
    for r in rows:
        if r[sparse_key] < r[dense_key]:
            return r["sparsity"]
    return None


# ---- kernels ----------------------------------------------------------------------------------------
def kernel(args) -> dict:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    out = {"threads": args.threads, "shapes": []}
    for rows, k, n in SHAPES:
        x = torch.randn(rows, k, generator=g)
        w = torch.randn(n, k, generator=g)
        xq = torch.randint(0, 256, (rows, k), generator=g, dtype=torch.uint8)
        wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        packed_dense, _ = ilib.pack_b(wq)
        raw = ilib.epilogue("raw", torch.int32, torch.zeros(n, dtype=torch.int32))
        yq = torch.empty(rows, n, dtype=torch.int32)
        table = []
        for s in SPARSITIES:
            ws = w.masked_fill(torch.rand(n, k, generator=g) < s, 0)
            csr = to_csr(ws)
            blk_f = to_block1x4(w.masked_fill((torch.rand(n, k // 4, generator=g) < s).repeat_interleave(4, 1), 0))
            wqs = wq.masked_fill((torch.rand(n, k // 4, generator=g) < s).repeat_interleave(4, 1), 0)
            rp, cb, vb = to_block1x4(wqs)
            vb = vb.contiguous().view(torch.int32).reshape(-1)
            wt = ws.to_sparse_csr()
            t = best_ms({
                "dense_f32": lambda: torch.nn.functional.linear(x, ws),
                "csr_f32_c": lambda: slib.spmm_f32(x, *csr, n, None, block=False, threads=args.threads),
                "block1x4_f32_c": lambda: slib.spmm_f32(x, *blk_f[:2], blk_f[2].reshape(-1), n, None, block=True,
                                                        threads=args.threads),
                "csr_f32_torch": lambda: torch.sparse.mm(wt, x.t()),
                "dense_int8_vnni": lambda: ilib.gemm(xq, packed_dense, n, raw, yq, args.threads),
                "block1x4_int8_vnni": lambda: slib.spmm_s8(xq, rp, cb, vb, n, None, threads=args.threads),
            }, args.repeats)
            row = {"sparsity": s, **{key: round(v, 3) for key, v in t.items()}}
            table.append(row)
            print(f"kernel {rows}x{k}->{n} {s:.0%}: " + ", ".join(f"{key} {v:.2f} ms" for key, v in t.items()),
                  flush=True)
        out["shapes"].append({
            "rows": rows, "in": k, "out": n, "table": table,
            "break_even_csr_f32": _break_even(table, "csr_f32_c", "dense_f32"),
            "break_even_block1x4_f32": _break_even(table, "block1x4_f32_c", "dense_f32"),
            "break_even_torch_csr": _break_even(table, "csr_f32_torch", "dense_f32"),
            "break_even_int8_block1x4": _break_even(table, "block1x4_int8_vnni", "dense_int8_vnni")})
        print(f"break-even (lowest sparsity measured faster than dense): "
              f"{ {k_: v for k_, v in out['shapes'][-1].items() if k_.startswith('break')} }", flush=True)
    return out


# ---- MiniLM -----------------------------------------------------------------------------------------
def minilm(args) -> dict:
    from graphopt.bench.corpus import calibration_texts
    from graphopt.bench.low_rank import minilm_graph, token_batches
    from graphopt.pipeline import calibration_batches

    torch.set_num_threads(args.threads)
    model, tok, graph = minilm_graph()

    def batches(corpus, n):
        return calibration_batches(graph, [((), b) for b in token_batches(tok, calibration_texts(corpus, n), 16)])

    calib = batches(args.calib_corpus, args.calib)
    evalb = calibration_batches(graph, [((), b) for b in token_batches(tok, zoo.sentences(args.eval), 25)])
    reference = [run(graph, *b)[0] for b in evalb]

    def cosine(g):       # {"cosine": mean, "cosine_min": worst sentence} over the held-out sentences
        outs = [run(g, *b)[0] for b in evalb]
        c = torch.cat([torch.nn.functional.cosine_similarity(a, r, dim=-1) for a, r in zip(outs, reference)])
        return {"cosine": c.mean().item(), "cosine_min": c.min().item()}

    out = {"calibration_sentences": args.calib, "calibration_corpus": args.calib_corpus, "eval_sentences": args.eval,
           "python": platform.python_version(), "weights": [], "structured": [],
           "pruned": "the 36 linear layers of the 6 encoder blocks (q, k, v, out, fc1, fc2), each at the sparsity; "
                     "not the embeddings, LayerNorms or the unused pooler"}
    # plain criteria one shot (sequential=false), then the additions: update (Wanda mask refitted), bias
    # correction (out / fc1 / fc2), sequential calibration (layer inputs from the model pruned so far)
    variants = [(c, {"sequential": False}) for c in ("magnitude", "wanda", "sparsegpt")]
    variants += [("wanda", {"update": True, "bias_correction": True, "sequential": True}),
                 ("sparsegpt", {"bias_correction": True, "sequential": True}),
                 ("wanda", {"refit": True, "damp": 0.3, "sequential": True})]   # Wanda's mask, weights + bias refitted
    others = not args.refit_only
    for pattern, sparsity in (("unstructured", 0.5), ("2:4", 0.5)) if others else ():
        for criterion, extra in variants:
            g, _ = PassManager([("sparsify", {"criterion": criterion, "pattern": pattern, "sparsity": sparsity,
                                              "exclude": ["*pooler*"], "substitute": "never", **extra})],
                               calibration=calib).run(graph)
            row = {"criterion": criterion, "pattern": pattern, "sparsity": sparsity, **extra, **cosine(g)}
            out["weights"].append(row)
            label = criterion + "".join(f" {k}" for k, v in extra.items() if v is True)
            print(f"minilm {label:45s} {pattern:12s} {sparsity:.0%}: embedding cosine {row['cosine']:.4f} "
                  f"(min {row['cosine_min']:.4f})",
                  flush=True)
    if args.refit_calib:     # the refit fits ~2k templated tokens (0.99 there); more, more varied text generalises better
        extra = {"refit": True, "damp": args.refit_damp, "sequential": True, "allocation": args.refit_allocation,
                 "refit_target": args.refit_target}
        g, report = PassManager([("sparsify", {"criterion": "wanda", "sparsity": 0.5, "exclude": ["*pooler*"],
                                               "substitute": "never", **extra})],
                                calibration=batches(args.refit_corpus, args.refit_calib)).run(graph)
        sizes, removed = {}, {}
        for d in report["sparsify"].details["layers"].values():
            n = d["shape"][0] * d["shape"][1]
            sizes[d["role"]] = sizes.get(d["role"], 0) + n
            removed[d["role"]] = removed.get(d["role"], 0) + d["sparsity"] * n
        row = {"criterion": "wanda", "pattern": "unstructured", "sparsity": 0.5, **extra,
               "calibration_corpus": args.refit_corpus, "calibration_sentences": args.refit_calib,
               "sparsity_reached": g.meta["sparsify_sparsity"],
               "role_sparsity": {r: round(removed[r] / sizes[r], 4) for r in sizes}, **cosine(g)}
        out["weights"].append(row)
        print(f"minilm wanda refit (damp {args.refit_damp:g}, target {args.refit_target}, {args.refit_allocation} "
              f"allocation), {args.refit_calib} {args.refit_corpus} calibration sentences  unstructured "
              f"{row['sparsity_reached']:.1%}: embedding cosine {row['cosine']:.4f} (min {row['cosine_min']:.4f}); "
              "per role " + ", ".join(f"{r} {v:.1%}" for r, v in row["role_sparsity"].items()), flush=True)
    for extra in ({}, {"refit": True, "damp": 0.3}) if others else ():
        g, _ = PassManager([("sparsify", {"criterion": "wanda", "sparsity": 0.5, "allocation": "sensitivity",
                                          "exclude": ["*pooler*"], "substitute": "never", **extra})],
                           calibration=calib).run(graph)
        row = {"criterion": "wanda", "pattern": "unstructured", "sparsity": 0.5, "allocation": "sensitivity",
               **extra, **cosine(g)}
        out["weights"].append(row)
        print(f"minilm wanda{' refit' if extra else ''} unstructured 50% allocated by sensitivity: embedding cosine "
              f"{row['cosine']:.4f} (min {row['cosine_min']:.4f})", flush=True)
    for fraction in (0.25, 0.5) if others else ():
        for reform in (False, True):
            g, _ = PassManager([("sparsify", {"criterion": "wanda", "pattern": "neurons", "sparsity": fraction,
                                              "reform": reform})], calibration=calib).run(graph)
            row = {"pattern": "neurons", "removed": fraction, "reform": reform, **cosine(g)}
            out["structured"].append(row)
            print(f"minilm neurons -{fraction:.0%} reform={reform}: embedding cosine {row['cosine']:.4f} "
                  f"(min {row['cosine_min']:.4f})", flush=True)
    return out


# ---- digits ViT ---------------------------------------------------------------------------------------
def digits(args) -> dict:
    from graphopt.frontends import from_torch

    torch.set_num_threads(args.threads)
    case = zoo.digits_vit()
    graph = from_torch(case.model, (), case.kwargs)
    imgs = case.train_images[:512]
    calib = [(imgs[i:i + 64],) for i in range(0, len(imgs), 64)]
    test = case.test_images

    def acc(g):
        return case.accuracy(lambda x: run(g, x)[0])

    variants = {"dense": graph}
    for pattern in ("neurons", "structured"):
        for fraction in (0.25, 0.5):
            for allocation in ("uniform", "sensitivity"):
                name = f"{pattern} -{fraction:.0%} reformed" + (", allocated" if allocation == "sensitivity" else "")
                options = {"criterion": "wanda", "pattern": pattern, "sparsity": fraction, "allocation": allocation}
                variants[name] = PassManager([("sparsify", options)], calibration=calib).run(graph)[0]
    execs = {k: TorchExecutable(g) for k, g in variants.items()}
    times = best_ms({k: (lambda e=e: e.run_flat(test)) for k, e in execs.items()}, args.repeats)
    out = {"test_images": len(test), "rows": []}
    for k, g in variants.items():
        row = {"variant": k, "accuracy": acc(g), "ms": times[k], "speedup": times["dense"] / times[k]}
        out["rows"].append(row)
        print(f"digits {k:39s} accuracy {row['accuracy']:.4f} time {row['ms']:.1f} ms ({row['speedup']:.2f}x)",
              flush=True)
    return out


# ---- DeiT-S-shaped ViT, batch 8 ----------------------------------------------------------------------------
def deit(args) -> dict:
    from graphopt.frontends import from_torch

    torch.set_num_threads(args.threads)
    case = zoo.deit_small(batch=8)
    graph = from_torch(case.model, case.args, case.kwargs)
    calib = [(torch.randn(8, 3, 224, 224),) for _ in range(2)]
    x = case.args[0] if case.args else next(iter(case.kwargs.values()))
    variants = {"dense": graph}
    structured, _ = PassManager([("sparsify", {"criterion": "wanda", "pattern": "structured", "sparsity": 0.5})],
                                calibration=calib).run(graph)
    variants["structured 50%"] = structured
    unstructured, rep = PassManager([("sparsify", {"criterion": "magnitude", "sparsity": 0.9, "rows": 1576,
                                                   "threads": args.threads})], calibration=calib[:1]).run(graph)
    variants["unstructured 90% (measured substitution)"] = unstructured
    execs = {k: TorchExecutable(g) for k, g in variants.items()}
    times = best_ms({k: (lambda e=e: e.run_flat(x)) for k, e in execs.items()}, args.repeats)
    out = {"batch": 8, "threads": args.threads, "rows": [],
           "substitution": rep["sparsify"].details.get("decisions", [])}
    for k in variants:
        row = {"variant": k, "ms": times[k], "speedup": times["dense"] / times[k],
               "sparse_linear_layers": len(variants[k].find_nodes("sparse_linear"))}
        out["rows"].append(row)
        print(f"deit {k:42s} {row['ms']:.0f} ms ({row['speedup']:.2f}x), {row['sparse_linear_layers']} sparse layers",
              flush=True)
    return out


def int8(args) -> dict:
    """DeiT-S batch 8 on the cpu_integer kernels: integer_only alone, and after 1x4-block pruning of the fc2
    layers (K = 1536, 90%) so they run on the sparse int8 kernel (cpu.int_spmm)."""
    from graphopt.backends.cpu_integer import CpuIntegerExecutable
    from graphopt.frontends import from_torch

    torch.set_num_threads(args.threads)
    case = zoo.deit_small(batch=8)
    graph = from_torch(case.model, case.args, case.kwargs)
    x = case.args[0] if case.args else next(iter(case.kwargs.values()))
    calib = [(torch.randn(8, 3, 224, 224),) for _ in range(2)]
    dense, _ = PassManager(["integer_only"], calibration=calib).run(graph)
    pruned, _ = PassManager([("sparsify", {"criterion": "magnitude", "pattern": "block1x4", "sparsity": 0.9,
                                           "roles": ["fc2"], "substitute": "never"}), "integer_only"],
                            calibration=calib).run(graph)
    execs = {"integer_only": CpuIntegerExecutable(dense, threads=args.threads),
             "block1x4 90% fc2 + integer_only": CpuIntegerExecutable(pruned, threads=args.threads)}
    times = best_ms({k: (lambda e=e: e.run_flat(x)) for k, e in execs.items()}, args.repeats)
    spmm = str(execs["block1x4 90% fc2 + integer_only"].report).count("cpu.int_spmm")
    out = {"batch": 8, "threads": args.threads, "rows": [{"variant": k, "ms": v, "speedup": times["integer_only"] / v}
                                                          for k, v in times.items()], "report_mentions_spmm": spmm}
    for row in out["rows"]:
        print(f"int8 deit {row['variant']:34s} {row['ms']:.0f} ms ({row['speedup']:.2f}x)", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="kernel,minilm,digits,deit,int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calib", type=int, default=128, help="MiniLM calibration sentences")
    p.add_argument("--calib-corpus", default="templated", choices=["templated", "stdlib", "mix", "mixshort"],
                   help="MiniLM calibration text (bench/corpus.py): templated, stdlib docstrings, or a mix")
    p.add_argument("--refit-calib", type=int, default=512, help="sentences of the extra refit row (0: no such row)")
    p.add_argument("--refit-corpus", default="mix", choices=["templated", "stdlib", "mix", "mixshort"],
                   help="calibration text of the extra refit row")
    p.add_argument("--refit-damp", type=float, default=0.3, help="damp of the extra refit row")
    p.add_argument("--refit-allocation", default="uniform", choices=["uniform", "sensitivity", "owl"],
                   help="allocation of the extra refit row (sensitivity: ~7 min more on 2 busy cores)")
    p.add_argument("--refit-target", default="layer", choices=["layer", "residual"],
                   help="refit target of the extra refit row (residual: out / fc2 refitted to the dense residual sum)")
    p.add_argument("--refit-only", action="store_true", help="MiniLM: only the extra refit row")
    p.add_argument("--eval", type=int, default=100, help="MiniLM evaluation sentences")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "sparse.json"
    for part in args.only.split(","):
        result = {"kernel": kernel, "minilm": minilm, "digits": digits, "deit": deit, "int8": int8}[part](args)
        result["load_average"] = os.getloadavg()   # measured, not assumed: above the core count, times are noise
        if result["load_average"][0] > (os.cpu_count() or 1):
            result["machine_note"] = (f"load average {result['load_average'][0]:.1f} on {os.cpu_count()} cores while "
                                      "this part ran: its times are noise, re-run on a quiet machine")
        results = json.loads(path.read_text()) if path.exists() else {}   # parts may run in separate processes
        results[part] = result
        path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
