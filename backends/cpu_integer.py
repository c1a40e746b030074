"""``cpu_integer`` backend: the integer graph of ``integer_only`` as fused integer CPU kernels.

Stock ONNX Runtime runs an integer-only transformer as thousands of small int32 elementwise ops
(each requantization is 4-5 passes over memory). This backend applies the ``cpu_integer`` fusion
rules of the kernel layer (``cpu_integer_fusions``: GEMMs with the requantization, ShiftGELU table or
residual add in the epilogue; attention scores straight into Shiftmax; LayerNorm with its requant)
and runs the result with the torch backend, so layout ops and anything not fused keep their
reference implementations. Every kernel computes the reference's integers (tests compare bit for
bit). ``report`` lists what became which kernel and what stayed on the reference ops, with the
reason its rules gave (the same reasons ``why_not`` prints).
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch

import graphopt.backends.cpu_integer_sparse  # noqa: F401  (sparse int8 GEMM rules, priority over the dense ones)
import graphopt.backends.cpu_integer_fusions  # noqa: F401  (registers the fusion rules)
from graphopt.backends import LoweringError
from graphopt.backends import cpu_integer_library as kernels
from graphopt.backends.cpu_integer_fusions import SIBLING_SHIFTS, SIBLINGS, TARGET, kernel_node
from graphopt.backends.cpu_integer_layout import fold_attention_outputs, fold_key_head_sums, fold_patchify
from graphopt.backends.cpu_integer_replay import Replay
from graphopt.backends.cpu_integer_rows import mark_live_rows
from graphopt.backends.kernels import fusion_rules
from graphopt.backends.registry import register_backend
from graphopt.backends.torch_backend import TorchExecutable
from graphopt.ir import Graph
from graphopt.ir.structure import constant_derived
from graphopt.ir.rewrite import why_not_at
from graphopt.ir.verifier import verify


SIBLING_RULES = (SIBLINGS, SIBLING_SHIFTS)   # their report entry names the rule and every layer it joined

# Integer ops no cpu_integer rule starts from, and why they stay on their reference implementation.
NOT_FUSED = {
    "int.shiftgelu": "fused only as a table inside a GEMM epilogue (gemm_gelu_table, patch_conv_gelu_table)",
    "int.lookup": "fused only as the proportional-attention term of a Shiftmax kernel's logits "
                  "(bmm_add_size_bias_requant_shiftmax, bmm_requant_size_bias_shiftmax, shiftmax_size_bias); "
                  "elsewhere it runs by its reference op",
}


class Lowered(NamedTuple):
    """One report entry: ``kernel`` is the cpu.* op made (or "reference"), ``nodes`` what it replaced (or why not)."""
    kernel: str
    nodes: str


class KernelReport(list):
    """What became which kernel and what stayed on the reference ops; prints as a short summary.
    ``padding_rows``: how many kernels compute only the real tokens of a padded batch."""
    padding_rows = 0

    def __str__(self) -> str:
        made = Counter(e.kernel for e in self if e.kernel != "reference")
        kept = [e.nodes for e in self if e.kernel == "reference"]
        lines = [f"cpu_integer: {sum(made.values())} kernel(s)" + (": " + ", ".join(f"{k} x{n}" for k, n in sorted(made.items())) if made else "")]
        lines += [f"left on the reference ops: {len(kept)}"] + [f"  {why}" for why in kept] if kept else []
        if self.padding_rows:
            lines.append(f"{self.padding_rows} kernel(s) compute only the real tokens of a padded batch "
                         "(its outputs are 0 at padding: zero_padded_positions)")
        return "\n".join(lines)


def lower_to_kernels(graph: Graph, threads: int | None = None) -> tuple[Graph, KernelReport]:
    """A copy of ``graph`` with its integer chains fused into cpu.* kernel ops (the target's rewrite
    rules), and the report: each kernel with the nodes it replaced, each integer op left on its
    reference implementation with the reason its rules refused it.
    A graph without integer ops is refused: running it here would silently be the float model."""
    if not any(n.op.startswith("int.") for n in graph.nodes):
        raise LoweringError(f"backend 'cpu_integer': graph {graph.name!r} has no integer ops, so nothing would be "
                            "lowered to the integer kernels; run the 'integer_only' pass first (it needs calibration "
                            "data), or use backend='torch' for a float graph")
    lowered, report = graph.clone(), KernelReport()
    rules = fusion_rules(TARGET)
    def lowered_by(rule, nodes, new):
        kernel = kernel_node(new)
        kernel.meta["report_entry"] = len(report)     # a later fold merges entries by it
        report.append(Lowered(
            f"{kernel.op} ({rule.name})" if rule in SIBLING_RULES else kernel.op,
            new.producer.inputs[0].producer.meta["siblings"] if rule in SIBLING_RULES else
            " -> ".join(n.label() for n in reversed(nodes))
            + "".join(f" [{n.meta['sparse_decision']}]" for n in nodes if "sparse_decision" in n.meta)))

    rules.apply(lowered, on_fire=lowered_by)
    for node in lowered.nodes:
        if node.op.startswith("int."):
            why = why_not_at(lowered, node, rules.rules) or NOT_FUSED.get(node.op, f"no {TARGET} rule for {node.op}")
            report.append(Lowered("reference", f"{node.label()}: {why}"))
        elif node.op.startswith("cpu."):
            node.attrs["threads"] = threads or torch.get_num_threads()
    for quantize in fold_patchify(lowered):                       # its entry says it writes the patches
        at, (ph, pw) = quantize.meta["report_entry"], quantize.attrs["patch"][:2]
        report[at] = Lowered(report[at].kernel, f"{report[at].nodes} -> reshape -> permute (written as {ph}x{pw} patches)")
    merged = {}
    for kernel, requant in fold_attention_outputs(lowered):      # the requant's entry joins its attention's
        into, gone = kernel.meta["report_entry"], requant.meta["report_entry"]
        report[into] = Lowered(report[into].kernel, f"{report[into].nodes} -> {report[gone].nodes}")
        merged[gone] = into
    report[:] = [e for i, e in enumerate(report) if i not in merged]
    fold_key_head_sums(lowered)
    report.padding_rows = mark_live_rows(lowered)
    lowered.remove_unused_constants()
    verify(lowered)
    return lowered, report


class CpuIntegerExecutable(TorchExecutable):
    """Called like the source model; ``.report`` says which nodes became which kernel. From the second call
    with the same input shapes on, the forward is replayed from its recorded kernel calls (``.replay``:
    cpu_integer_replay; ``replay=False``: always the fx graph)."""

    def __init__(self, graph: Graph, *, threads: int | None = None, replay: bool = True):
        lowered, self.report = lower_to_kernels(graph, threads)  # a float graph is refused before any build
        kernels.library()                    # build the kernels now: a missing compiler fails here
        super().__init__(lowered)
        self.replay = Replay(self._run_graph, list(self.graph_module.buffers()),
                             refuse=_outside_the_recording(lowered)) if replay else None

    def run_flat(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """torch's own ops here are layout glue (reshape, contiguous) between kernels: run on one thread, so
        torch's OpenMP workers do not spin on the cores the kernels' thread pool needs (DeiT-S b8, 2 threads:
        81 -> 59 ms, the same as with OMP_WAIT_POLICY=PASSIVE)."""
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.replay(*tensors) if self.replay is not None else self._run_graph(*tensors)
        finally:
            torch.set_num_threads(previous)

    def _run_graph(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super().run_flat(*tensors)


def _outside_the_recording(graph: Graph) -> str | None:
    """Why a forward of ``graph`` cannot be replayed whatever its inputs, or None: an ONNX-opaque node on graph
    inputs runs in ONNX Runtime through numpy, which the recording does not see, so a replay would keep the
    captured call's result (the exact exporter's GatherND on a BERT's attention mask)."""
    for node in graph.nodes:
        if node.op == "onnx_opaque" and not all(constant_derived(v) for v in node.inputs if v is not None):
            return (f"{node.label()} (ONNX {node.attrs['op_type']}) runs in ONNX Runtime on values the inputs "
                    "change, outside the recorded kernels")
    return None


@register_backend("cpu_integer")
def _cpu_integer(graph: Graph, *, threads: int | None = None, replay: bool = True):
    return CpuIntegerExecutable(graph, threads=threads, replay=replay).eval()
