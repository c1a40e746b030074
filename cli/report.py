"""What opt-cli shows and writes about a run: the before/after and --check tables, and the report
file (JSON, or the HTML page with the cost model's figures and block drawings)."""
from __future__ import annotations

import json

from graphopt.cli.load import ModelSide


def human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _human_count(n) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _delta(a, b) -> str:
    if a == b:
        return ""
    return f"{b - a:+d}"


def summary_tables(summary) -> list:
    from rich.table import Table

    before, after = summary["input"], summary["output"]
    title = f"{summary['source']} -> {after.path or '(not written)'}"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    total_b, total_a = sum(before.ops.values()), sum(after.ops.values())
    table.add_row("ops (total)", str(total_b), str(total_a), _delta(total_b, total_a))
    for op in sorted(set(before.ops) | set(after.ops)):
        b, a = before.ops.get(op, 0), after.ops.get(op, 0)
        table.add_row(f"  {op}", str(b), str(a), _delta(b, a))
    table.add_row("parameters", _human_count(before.parameters), _human_count(after.parameters),
                  _delta(before.parameters, after.parameters))
    table.add_row("weight bytes", human_bytes(before.weight_bytes), human_bytes(after.weight_bytes), "")
    table.add_row("file bytes", human_bytes(before.file_bytes), human_bytes(after.file_bytes), "")
    tables = [table]
    check = summary["check"]
    if check is not None:
        t = Table(title=f"--check in ONNX Runtime ({summary['inputs']['source']}, median of {check['runs']} runs)",
                  title_justify="left")
        t.add_column("figure")
        t.add_column("value", justify="right")
        t.add_row("max abs error", f"{check['max_abs_error']:.3e}")
        t.add_row("cosine similarity", f"{check['cosine']:.6f}")
        for name, o in check["outputs"].items():
            if "compared" in o:
                t.add_row(f"output {name}", o["compared"])
        t.add_row("latency before", f"{check['latency_before_ms']:.2f} ms")
        t.add_row("latency after", f"{check['latency_after_ms']:.2f} ms")
        t.add_row("latency ratio (after / before)", f"{check['latency_ratio']:.3f}x")
        t.add_row("result", "[green]passed[/green]" if check["passed"] else f"[bold red]FAILED: {check['verdict']}[/bold red]")
        tables.append(t)
    pipeline = summary["pipeline"]
    if pipeline.passes:
        tables.insert(0, pipeline.table(verbose=summary.get("verbose", False)))
    return tables


def print_summary(summary) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped or captured: wide enough that no column is cut
    for table in summary_tables(summary):
        console.print(table)
    if summary.get("custom_ops_library"):
        console.print(f"ONNX Runtime custom-op library: {summary['custom_ops_library']} (load it with "
                      "SessionOptions.register_custom_ops_library)", highlight=False)


def report_dict(summary) -> dict:
    from graphopt import __version__

    def side(s: ModelSide):
        return {"path": s.path, "sha256": s.sha256, "file_bytes": s.file_bytes, "parameters": s.parameters,
                "weight_bytes": s.weight_bytes, "ops": s.ops, "ops_total": sum(s.ops.values())}

    return {"tool": "opt-cli", "graphopt_version": __version__, "source": summary["source"],
            "input": side(summary["input"]), "output": side(summary["output"]), "passes": summary["passes"],
            "pipeline": summary["pipeline"].to_dict(), "check": summary["check"], "inputs": summary["inputs"],
            "timings_seconds": summary["timings"], "files_written": summary["written"],
            "custom_ops_library": summary.get("custom_ops_library")}


def write_report(path, summary) -> None:
    from graphopt.ir.files import atomic_write
    from graphopt.passes.report import json_safe

    data = report_dict(summary)
    if path.lower().endswith(".json"):
        text = json.dumps(json_safe(data), indent=2, allow_nan=False, default=str)
    else:
        text = _html_report(summary, data)
    atomic_write(path, text.encode())


def _html_report(summary, data) -> str:
    """The HTML page: the pipeline's report plus the cost model's figures and a block drawing, before and after."""
    from graphopt.ir.cost import graph_cost
    from graphopt.passes.report_html import render_html

    pipeline = summary["pipeline"]
    pipeline.cost_before, pipeline.cost_after = graph_cost(summary["graph_before"]), graph_cost(summary["graph_after"])
    return render_html(pipeline, title=f"graphopt report: {data['source']}",
                       intro=f"passes: {', '.join(data['passes']) or '(none)'}; inputs: {data['inputs'].get('source')}",
                       check=summary["check"], models={"input": data["input"], "output": data["output"]},
                       graph_before=summary["graph_before"], graph_after=summary["graph_after"],
                       cost_dims=summary["dims"] or None,
                       files={"output model": data["output"]["path"]} if data["output"]["path"] else None)
