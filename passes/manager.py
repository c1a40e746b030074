"""The pass manager: runs a pipeline transactionally.

Each pass runs on a clone of the graph (constants shared, so cloning is cheap). The clone is
adopted only when the pass returns, the verifier accepts the result, the pass's ``ensures``
holds and, when example inputs are given, the outputs stay within the pass's tolerance of the
graph before it; with example inputs but no check, the result must at least still run on them.
Otherwise the graph stays as it was and a PassError names the pass (and node): no other exception
escapes a pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from graphopt.ir import Graph, VerificationError, verify
from graphopt.ir.interpreter import failing_node
from graphopt.passes import CalibrationMissing, PassError
from graphopt.passes.registry import PassSpec, make_spec
from graphopt.passes.report import PassRecord, Report, tokens_per_block
from graphopt.progress import task


@dataclass
class PassContext:
    """What a pass sees besides the graph: its options, data, and a place to report."""
    spec: PassSpec
    example_inputs: tuple[torch.Tensor, ...] | None = None
    calibration: Any = None  # list of flat input tuples (one tensor per graph input), or None
    notes: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # structured facts for reports (per layer, per op)

    @property
    def options(self) -> dict[str, Any]:
        return self.spec.options

    def require_calibration(self) -> list[tuple[torch.Tensor, ...]]:
        """The calibration batches, or a clear error saying the pass needs them."""
        if not self.calibration:
            raise CalibrationMissing(self.spec, "needs calibration data: pass calibration=[inputs, ...] to "
                                       "graphopt.optimize (or --calib FILE.npz to opt-cli)", [])
        return self.calibration

    def note(self, message: str) -> None:
        self.notes.append(message)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n


class PassManager:
    def __init__(self, passes: Sequence, *, example_inputs: Sequence[torch.Tensor] | None = None,
                 calibration: Any = None, check: bool = False):
        """``example_inputs``: flat tensors, one per graph input. With ``check=True`` each pass
        is compared numerically against the graph before it on those inputs."""
        self.specs = [make_spec(p) for p in passes]
        self.example_inputs = tuple(example_inputs) if example_inputs is not None else None
        self.calibration = calibration
        self.check = check
        if check and self.example_inputs is None:
            raise ValueError("check=True needs example_inputs")

    def run(self, graph: Graph, report: Report | None = None) -> tuple[Graph, Report]:
        report = report if report is not None else Report()
        done: list[str] = []
        reference = None
        if self.check:
            try:
                reference = self._outputs(graph)
            except Exception as e:
                where = failing_node(graph, self.example_inputs)
                raise ValueError(f"the graph given to the passes does not run on its example inputs"
                                 f"{f' (at {where.label()})' if where else ''}: {type(e).__name__}: {e}") from e
        for i, spec in enumerate(self.specs, 1):
            try:
                with task(f"pass {i}/{len(self.specs)}: {spec}"):
                    graph, reference = self._run_one(spec, graph, reference, report, done)
            except PassError:
                raise
            except Exception as e:  # a requires/ensures hook or the verifier itself failed
                raise PassError(spec, f"raised {type(e).__name__}: {e}", done, getattr(e, "node", None)) from e
            done.append(str(spec))
        return graph, report

    def _run_one(self, spec: PassSpec, graph: Graph, reference, report: Report, done):
        info = spec.info
        if info.requires is not None:
            reason = info.requires(graph)
            if reason:
                raise PassError(spec, f"does not apply: {reason}", done)
        work = graph.clone()
        ctx = PassContext(spec, self.example_inputs, self.calibration)
        start = time.perf_counter()
        try:
            result = info.fn(work, ctx, **spec.options)
        except PassError:
            raise
        except Exception as e:
            raise PassError(spec, f"raised {type(e).__name__}: {e}", done, getattr(e, "node", None)) from e
        seconds = time.perf_counter() - start
        if isinstance(result, Graph):
            work = result
        try:
            verify(work)
        except VerificationError as e:
            raise PassError(spec, f"left an invalid graph: {e}", done, e.node) from e
        if info.ensures is not None:
            reason = info.ensures(work)
            if reason:
                raise PassError(spec, f"did not establish its postcondition: {reason}", done)
        error = None
        outputs = self._outputs_after(spec, work, done) if self.example_inputs is not None else None
        if reference is not None:
            error = max_abs_error(reference, outputs)
            if info.tolerance is not None and not error <= info.tolerance:
                raise PassError(spec, f"changed the outputs by max abs error {error:.3g}, "
                                      f"over its tolerance {info.tolerance:g}", done)
            reference = outputs
        report.passes.append(PassRecord(str(spec), len(graph), len(work), seconds, error,
                                        ctx.notes, ctx.counters, graph.op_counts(), work.op_counts(),
                                        {"tokens_per_block": tokens_per_block(work), **ctx.details}))
        return work, reference

    def _outputs(self, graph: Graph):
        from graphopt.ir.interpreter import run
        return run(graph, *self.example_inputs)

    def _outputs_after(self, spec: PassSpec, work: Graph, done):
        """The pass's result run on the example inputs; a PassError naming the failing node if it does not run."""
        try:
            return self._outputs(work)
        except Exception as e:
            where = failing_node(work, self.example_inputs)
            at = f" at {where.label()}" if where is not None else ""
            raise PassError(spec, f"its result fails on the example inputs{at}: {type(e).__name__}: {e}",
                            done, where) from e


def max_abs_error(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference over all outputs; inf when shapes or count differ."""
    if len(expected) != len(actual):
        return float("inf")
    worst = 0.0
    for a, b in zip(expected, actual):
        if a.shape != b.shape:
            return float("inf")
        if a.numel():
            worst = max(worst, (a.double() - b.double()).abs().max().item())
    return worst
