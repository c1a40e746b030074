"""What a pipeline did: per pass, nodes before/after, time, numerical error, notes."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field


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


@dataclass
class Report:
    passes: list[PassRecord] = field(default_factory=list)
    capture_seconds: float | None = None
    cost_before: object = None  # graphopt.ir.cost.GraphCost of the graph before the pipeline
    cost_after: object = None

    def cost(self, **dims: int) -> dict[str, dict[str, float]]:
        """Before/after FLOPs, bytes and parameters at concrete dims (``batch=8``) and their ratio."""
        if self.cost_before is None or self.cost_after is None:
            raise ValueError("this report has no cost figures (run through graphopt.optimize)")
        b, a = self.cost_before.at(**dims), self.cost_after.at(**dims)
        return {k: {"before": b[k], "after": a[k], "ratio": a[k] / b[k] if b[k] else float("nan")} for k in b}

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
        return {"capture_seconds": self.capture_seconds, "passes": [asdict(r) for r in self.passes], "cost": cost}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self):
        from rich.table import Table

        table = Table(title="graphopt pipeline")
        for col in ("pass", "nodes before", "nodes after", "time (ms)", "max abs error", "notes"):
            table.add_column(col, justify="left" if col in ("pass", "notes") else "right")
        for r in self.passes:
            err = "-" if r.max_abs_error is None else f"{r.max_abs_error:.2e}"
            notes = "; ".join(r.notes + [f"{k}={v}" for k, v in r.counters.items()])
            table.add_row(r.name, str(r.nodes_before), str(r.nodes_after), f"{r.seconds * 1e3:.1f}", err, notes)
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, file=io.StringIO(), color_system=None)
        console.print(self.table())
        return console.file.getvalue()
