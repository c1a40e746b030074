"""The pipeline report as one self-contained HTML page: per-pass tables, integer coverage, tokens per
block, low-rank ranks, cost before/after, ``--check`` figures, attached trade-off curves and a drawing
of one block before and after. Plots are matplotlib PNGs embedded as base64; the page has no script
and loads nothing from outside."""
from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter

from graphopt.ir.files import atomic_write
from graphopt.passes.report import Report

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;font-size:.9em}
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.pass{border:1px solid #ddd;border-radius:6px;padding:.2em 1em .8em;margin:1em 0}
.better{color:#17702b}.worse{color:#a31515}img{max-width:100%}figure{margin:.6em 0}
figcaption{font-size:.85em;color:#555}details{margin:.4em 0}summary{cursor:pointer;color:#335}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.85em}.row{display:flex;gap:1em;flex-wrap:wrap}
"""


def render_html(report: Report, *, title: str = "graphopt report", intro: str = "", check: dict | None = None,
                graph_before=None, graph_after=None, models: dict | None = None, files: dict | None = None,
                cost_dims: dict | None = None) -> str:
    """The page. ``graph_before``/``graph_after``: IR graphs for the block drawing; ``models``: name ->
    dict of figures (ops, parameters, bytes) shown side by side; ``files``: label -> path written beside
    the report (e.g. an ``.onnx`` for Netron); ``cost_dims``: dims for the cost figures (default batch=1)."""
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{_STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    if intro:
        parts.append(f"<p>{_e(intro)}</p>")
    parts.append(_section("pipeline", "Pipeline", _overview(report)))
    for name, rows in report.tables.items():
        parts.append(_section("table-" + _slug(name), name, _table(rows)))
    if report.curves:
        parts.append(_section("trade-offs", "Trade-offs", "<div class=\"row\">" + "".join(
            _figure(_curve_png(c), c.name) for c in report.curves) + "</div>"))
    if report.cost_before is not None and report.cost_after is not None:
        parts.append(_section("cost", "Cost before and after (symbolic cost model)", _cost(report, cost_dims)))
    if check:
        parts.append(_section("check", "--check (both models in ONNX Runtime)", _check(check)))
    if models:
        parts.append(_section("models", "Models", _models(models)))
    for i, record in enumerate(report.passes, 1):
        parts.append(_section(f"pass-{i}", f"Pass {i}: {record.name}", _pass(record), cls="pass"))
    if graph_before is not None and graph_after is not None:
        parts.append(_section("graph", "One block before and after", _graph_view(graph_before, graph_after)))
    if files:
        items = "".join(f"<li>{_e(label)}: <code>{_e(path)}</code></li>" for label, path in files.items())
        parts.append(_section("files", "Files written beside this report",
                              f"<ul>{items}</ul><p>ONNX files open in Netron (netron.app or the desktop app).</p>"))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(path: str, report: Report, **options) -> str:
    """Write :func:`render_html`'s page to ``path`` atomically (a reader never sees half a page) and
    return the path."""
    atomic_write(path, render_html(report, **options).encode("utf-8"))
    return path


# ---- sections --------------------------------------------------------------------------------------
def _overview(report: Report) -> str:
    rows = [{"pass": r.name, "nodes before": r.nodes_before, "nodes after": r.nodes_after,
             "time (ms)": round(r.seconds * 1e3, 1),
             "max abs error": "-" if r.max_abs_error is None else f"{r.max_abs_error:.3g}",
             "summary": "; ".join(f"{k}={v}" for k, v in r.counters.items())} for r in report.passes]
    capture = f"<p>capture: {report.capture_seconds:.2f} s</p>" if report.capture_seconds is not None else ""
    return capture + (_table(rows) if rows else "<p>no passes ran</p>")


def _pass(record) -> str:
    out = [_table([{"nodes before": record.nodes_before, "nodes after": record.nodes_after,
                    "time (ms)": round(record.seconds * 1e3, 1),
                    "max abs error vs the graph before": "not checked" if record.max_abs_error is None
                    else f"{record.max_abs_error:.3g}", **record.counters}])]
    changed = sorted(op for op in set(record.ops_before) | set(record.ops_after)
                     if record.ops_before.get(op, 0) != record.ops_after.get(op, 0))
    if changed:
        out.append("<h3>Op counts that changed</h3>" + _table(
            [{"op": op, "before": record.ops_before.get(op, 0), "after": record.ops_after.get(op, 0),
              "change": f"{record.ops_after.get(op, 0) - record.ops_before.get(op, 0):+d}"} for op in changed]))
    details = record.details
    if "integer_coverage" in details:
        out.append(_coverage(details["integer_coverage"]))
    tokens = details.get("tokens_per_block") or []
    if tokens and record.name.split(":")[0] in ("token_merge", "token_drop"):
        out.append("<h3>Tokens per block (keys each attention sees, from the graph's types)</h3>"
                   + _table([{"block": i, "tokens": t} for i, t in enumerate(tokens)]))
        if all(isinstance(t, int) for t in tokens):
            out.append(_figure(_bars_png([str(i) for i in range(len(tokens))], tokens, "block", "tokens"),
                               "tokens per block"))
    layers = details.get("layers") or {}
    if layers and all("rank" in d for d in layers.values()):          # low_rank
        out.append(_ranks(layers))
    elif layers and all("sparsity" in d for d in layers.values()):    # sparsify (weight level)
        out.append(_sparsity(layers))
    if record.notes:
        out.append(f"<details><summary>notes ({len(record.notes)})</summary><ul>"
                   + "".join(f"<li>{_e(n)}</li>" for n in record.notes) + "</ul></details>")
    return "\n".join(out)


def _coverage(cov: dict) -> str:
    converted = Counter(cov.get("converted", {}))
    left = cov.get("left_in_float", [])
    left_by_op = Counter(f["op"] for f in left)
    rows = [{"op": op, "converted to integer": converted.get(op, 0), "left in float": left_by_op.get(op, 0)}
            for op in sorted(set(converted) | set(left_by_op))]
    total_c, total_l = sum(converted.values()), len(left)
    head = (f"<h3>Integer conversion coverage</h3><p>{total_c} ops converted, {total_l} left in float "
            f"({100 * total_c / max(1, total_c + total_l):.1f}% converted).</p>")
    reasons = Counter((f["op"], f["reason"]) for f in left)
    why = ""
    if reasons:
        why = "<h4>Left in float, by reason</h4>" + _table(
            [{"op": op, "reason": reason, "nodes": n} for (op, reason), n in reasons.items()])
        why += ("<details><summary>every node left in float</summary>"
                + _table([{"node": f["node"], "reason": f["reason"]} for f in left]) + "</details>")
    return head + _table(rows) + why


def _ranks(layers: dict) -> str:
    rows = [{"layer": name, "shape": "x".join(map(str, d["shape"])), "role": d.get("role", ""),
             "rank": "dense" if d["rank"] is None else d["rank"], "full rank": d["full_rank"],
             "kept parameters": f"{100 * d['kept_fraction']:.0f}%", "why dense": d.get("dense_reason", "")}
            for name, d in layers.items()]
    names = list(layers)
    kept = [100 * d["kept_fraction"] for d in layers.values()]
    plot = _figure(_bars_png([_short(n) for n in names], kept, "layer", "kept parameters (%)", rotate=True),
                   "kept parameters per layer")
    return "<h3>Low-rank: rank per layer</h3>" + plot + _table(rows)


def _sparsity(layers: dict) -> str:
    rows = [{"layer": name, "shape": "x".join(map(str, d["shape"])), "role": d.get("role", ""),
             "zeros": f"{100 * d['sparsity']:.1f}%", "target": f"{100 * d['target_sparsity']:.1f}%",
             "runs as": d.get("decision", "dense GEMM"), "why": d.get("why", "")}
            for name, d in layers.items()]
    plot = _figure(_bars_png([_short(n) for n in layers], [100 * d["sparsity"] for d in layers.values()], "layer",
                             "zeros (%)", rotate=True), "zeros per layer")
    return "<h3>Sparsity per layer</h3>" + plot + _table(rows)


def _cost(report: Report, dims: dict | None) -> str:
    dims = dict(dims or {"batch": 1})
    try:
        figures = report.cost(**dims)
    except ValueError as e:  # a dim the caller did not give: show the formulas
        before, after = report.cost_before.total, report.cost_after.total
        return (f"<p>{_e(str(e))}; symbolic figures:</p>"
                + _table([{"figure": "flops", "before": str(before.flops), "after": str(after.flops)}]))
    rows = [{"figure": k.replace("_", " "), "before": _num(v["before"]), "after": _num(v["after"]),
             "after / before": f"{v['ratio']:.3f}"} for k, v in figures.items()]
    at = ", ".join(f"{k}={v}" for k, v in dims.items())
    return (f"<p>at {_e(at)}; parameters counts floating-point weights only (an integer graph's int8 weights "
            "are in param bytes)</p>" + _table(rows))


def _check(check: dict) -> str:
    rows = [{"figure": k.replace("_", " "), "value": _fmt(v)} for k, v in check.items() if not isinstance(v, dict)]
    out = _table(rows)
    if isinstance(check.get("outputs"), dict):
        out += "<h3>Per output</h3>" + _table([{"output": name, **{k: _fmt(v) for k, v in d.items()}}
                                               for name, d in check["outputs"].items()])
    return out


def _models(models: dict) -> str:
    keys = [k for k in next(iter(models.values())) if k != "ops"]
    labels = {"ops_total": "ops (total)", "sha256": "sha256", "file_bytes": "file bytes"}
    rows = [{"": labels.get(k, k.replace("_", " ")),
             **{name: _fmt(m.get(k))[:16] + "…" if k == "sha256" and m.get(k) else _fmt(m.get(k))
                for name, m in models.items()}} for k in keys]
    out = _table(rows)
    if all("ops" in m for m in models.values()):
        ops = sorted(set().union(*(m["ops"] for m in models.values())))
        out += "<h3>Ops</h3>" + _table([{"op": op, **{name: m["ops"].get(op, 0) for name, m in models.items()}}
                                         for op in ops])
    return out


# ---- the block drawing -----------------------------------------------------------------------------
_BLOCK = re.compile(r"^(.*?\b(?:layers?|blocks?|h|encoder\.layer)\.0)(?:\.|$)")


def first_block(graph) -> tuple[str | None, list]:
    """The module path of the first transformer block (``...layers.0``) and its nodes, in graph order."""
    prefix = None
    for node in graph.nodes:
        m = _BLOCK.match(str(node.meta.get("module", "")))
        if m:
            prefix = m.group(1)
            break
    if prefix is None:
        return None, []
    nodes = [n for n in graph.nodes if str(n.meta.get("module", "")) == prefix
             or str(n.meta.get("module", "")).startswith(prefix + ".")]
    return prefix, nodes


def _graph_view(before, after) -> str:
    prefix, nodes_b = first_block(before)
    _, nodes_a = first_block(after) if prefix else (None, [])
    if not nodes_b or not nodes_a:
        return "<p>no module path names a first block in these graphs, so no drawing</p>"
    return (f"<p>The nodes of <code>{_e(prefix)}</code>: {len(nodes_b)} before, {len(nodes_a)} after "
            "(op names; edges are data flow inside the block).</p><div class=\"row\">"
            + _figure(_dataflow_png(nodes_b, "before"), "before") + _figure(_dataflow_png(nodes_a, "after"), "after")
            + "</div>")


def _dataflow_png(nodes, title: str) -> str:
    import networkx as nx

    g = nx.DiGraph()
    producer = {}
    for i, n in enumerate(nodes):
        g.add_node(i, label=n.op)
        for o in n.outputs:
            producer[id(o)] = i
    for i, n in enumerate(nodes):
        for v in n.inputs:
            if v is not None and id(v) in producer:
                g.add_edge(producer[id(v)], i)
    for layer, generation in enumerate(nx.topological_generations(g)):
        for i in generation:
            g.nodes[i]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal", scale=1.0)
    pos = {k: (x, -y) for k, (x, y) in pos.items()}  # inputs at the top
    depth = max(nx.get_node_attributes(g, "layer").values(), default=0) + 1
    plt, fig, ax = _axes(6.5, max(4.0, 0.6 * depth))
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#888", node_size=700,
                           node_shape="s", connectionstyle="arc3,rad=0.25")  # curved: edges in a column stay visible
    colours = ["#cfe8d4" if g.nodes[i]["label"].startswith("int.") else "#dde6f5" for i in g.nodes]
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colours, node_size=700, node_shape="s")
    nx.draw_networkx_labels(g, pos, {i: g.nodes[i]["label"].replace("int.", "int.\n") for i in g.nodes},
                            ax=ax, font_size=6)
    ax.set_title(f"{title}: {len(nodes)} nodes (green: integer ops)", fontsize=9)
    ax.axis("off")
    return _png(plt, fig)


# ---- plots -----------------------------------------------------------------------------------------
def _axes(w: float, h: float):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _curve_png(curve) -> str:
    plt, fig, ax = _axes(5.2, 3.6)
    xs, ys = [p[0] for p in curve.points], [p[1] for p in curve.points]
    ax.plot(xs, ys, "o-")
    for x, y, label in curve.points:
        if label:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(curve.x_label)
    ax.set_ylabel(curve.y_label)
    ax.set_title(curve.name, fontsize=10)
    ax.grid(alpha=.3)
    return _png(plt, fig)


def _bars_png(labels, values, xlabel, ylabel, rotate: bool = False) -> str:
    plt, fig, ax = _axes(max(4.0, 0.28 * len(labels) + 2), 3.2 if not rotate else 4.2)
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=90 if rotate else 0, fontsize=7 if rotate else 9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=.3)
    return _png(plt, fig)


# ---- html helpers ----------------------------------------------------------------------------------
def _section(anchor: str, heading: str, body: str, cls: str = "") -> str:
    klass = f" class=\"{cls}\"" if cls else ""
    return f"<section id=\"{anchor}\"{klass}><h2>{_e(heading)}</h2>\n{body}\n</section>"


def _figure(png_b64: str, caption: str) -> str:
    return (f"<figure><img alt=\"{_e(caption)}\" src=\"data:image/png;base64,{png_b64}\">"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(r.get(c, "")) for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    cls = " class=\"n\"" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    return f"<td{cls}>{_e(_fmt(value))}</td>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "-" if value is None else str(value)


def _num(n) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _short(name: str) -> str:
    return name if len(name) <= 28 else "…" + name[-27:]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _e(text) -> str:
    return html.escape(str(text))
