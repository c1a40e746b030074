"""What a pipeline did: per pass, nodes before/after, time, numerical error, notes, and the
structured facts passes record (``details``); curves and tables a caller attaches for the HTML
report (``passes/report_html.py``)."""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field

NOTE_WIDTH = 160   # longer notes (lists of nodes or layers) only in verbose output and the HTML report
NOTES_SHOWN = 4


@dataclass
class PassRecord:
    name: str
    nodes_before: int
    nodes_after: int
    seconds: float
    max_abs_error: float | None
    notes: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # structured facts: per-layer ranks, per-op coverage, tokens

    def summary(self, verbose: bool = False) -> list[str]:
        """Counters, then the notes; unless verbose, long notes and all but the first few are left out."""
        lines = [", ".join(f"{k}={v}" for k, v in self.counters.items())] if self.counters else []
        if verbose:
            return lines + self.notes
        short = [n for n in self.notes if len(n) <= NOTE_WIDTH][:NOTES_SHOWN]
        lines += short
        if len(self.notes) > len(short):
            lines.append(f"(+{len(self.notes) - len(short)} more notes: report.format(verbose=True), "
                         "the HTML report)")
        return lines


@dataclass
class Curve:
    """A trade-off a caller measured (e.g. accuracy against latency for token_merge's r)."""
    name: str
    x_label: str
    y_label: str
    points: list[tuple[float, float, str]]  # (x, y, label of the point)


@dataclass
class Report:
    passes: list[PassRecord] = field(default_factory=list)
    capture_seconds: float | None = None
    cost_before: object = None  # graphopt.ir.cost.GraphCost of the graph before the pipeline
    cost_after: object = None
    curves: list[Curve] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=dict)  # name -> rows (same keys in each row)

    def cost(self, **dims: int) -> dict[str, dict[str, float]]:
        """Before/after FLOPs, bytes and parameters at concrete dims (``batch=8``) and their ratio."""
        if self.cost_before is None or self.cost_after is None:
            raise ValueError("this report has no cost figures (run through graphopt.optimize)")
        b, a = self.cost_before.at(**dims), self.cost_after.at(**dims)
        return {k: {"before": b[k], "after": a[k], "ratio": a[k] / b[k] if b[k] else float("nan")} for k in b}

    def attach_curve(self, name: str, points, x_label: str, y_label: str) -> None:
        """Add a trade-off curve to the HTML report: ``points`` are ``(x, y)`` or ``(x, y, label)``."""
        pts = [(float(p[0]), float(p[1]), str(p[2]) if len(p) > 2 else "") for p in points]
        self.curves.append(Curve(name, x_label, y_label, pts))

    def attach_table(self, name: str, rows: list[dict]) -> None:
        """Add a table (e.g. accuracy and latency per variant) to the HTML report."""
        self.tables[name] = [dict(r) for r in rows]

    def __getitem__(self, name: str) -> PassRecord:
        for record in self.passes:
            if record.name == name or record.name.split(":")[0] == name:
                return record
        raise KeyError(f"no pass {name!r} in this report; it has {[r.name for r in self.passes]}")

    def to_dict(self) -> dict:
        cost = None
        if self.cost_before is not None:
            cost = {"flops_before": str(self.cost_before.total.flops), "flops_after": str(self.cost_after.total.flops),
                    "parameters_before": self.cost_before.parameters, "parameters_after": self.cost_after.parameters}
        return json_safe({"capture_seconds": self.capture_seconds, "passes": [asdict(r) for r in self.passes],
                        "cost": cost, "curves": [asdict(c) for c in self.curves], "tables": self.tables})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def table(self, verbose: bool = False):
        from rich.table import Table

        table = Table(title="graphopt pipeline")
        for col in ("pass", "nodes before", "nodes after", "time (ms)", "max abs error", "notes"):
            table.add_column(col, justify="left" if col in ("pass", "notes") else "right")
        for r in self.passes:
            err = "-" if r.max_abs_error is None else f"{r.max_abs_error:.2e}"
            table.add_row(r.name, str(r.nodes_before), str(r.nodes_after), f"{r.seconds * 1e3:.1f}", err,
                          "\n".join(r.summary(verbose)))
        return table

    def format(self, verbose: bool = False, width: int = 120) -> str:
        from rich.console import Console

        console = Console(width=width, file=io.StringIO(), color_system=None)
        console.print(self.table(verbose))
        return console.file.getvalue()

    def __str__(self) -> str:
        return self.format()


def tokens_per_block(graph) -> list:
    """Tokens each attention sees (its keys' length), read off the graph's types: ints, or the
    symbolic dim as a string."""
    counts = []
    for node in graph.nodes:
        if node.op == "sdpa":
            dim = node.inputs[1].type.shape[-2]
        elif node.op in ("softmax", "int.shiftmax") and node.outputs[0].type.rank == 4:
            dim = node.outputs[0].type.shape[-1]
        else:
            continue
        counts.append(dim if isinstance(dim, int) else str(dim))
    return counts


def json_safe(value):
    """JSON-safe: non-finite floats become null (standard JSON has no Infinity or NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
