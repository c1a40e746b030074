"""Every op graphopt registers has an ONNX lowering (a kernel of target ``onnx``) or is listed in
``backends/onnx``'s ``NOT_LOWERED`` with the reason, never both: a new op cannot silently miss the
ONNX backend, and a listed op that gains a lowering must leave the list."""
from graphopt.backends.kernels import ops_with_kernels
from graphopt.backends.onnx import NOT_LOWERED
from graphopt.backends.registry import list_backends
from graphopt.ir.opdef import OPS, list_ops


def graphopt_ops() -> set[str]:
    """The ops of graphopt's own modules, with every built-in backend imported (tests and plugins
    register ops of their own in the same process)."""
    list_backends()
    return {op for op in list_ops() if OPS.owner(op).startswith("graphopt.")}


def coverage_problems(ops: set[str], lowered: set[str], not_lowered: dict[str, str]) -> list[str]:
    problems = [f"{op}: no ONNX lowering; register one (graphopt.backends.onnx.register_lowering) or list it "
                "in backends/onnx NOT_LOWERED with the reason" for op in sorted(ops - lowered - set(not_lowered))]
    problems += [f"{op}: has an ONNX lowering and is still listed in NOT_LOWERED"
                 for op in sorted(lowered & set(not_lowered))]
    problems += [f"{op}: listed in NOT_LOWERED but no such op is registered" for op in sorted(set(not_lowered) - ops)]
    problems += [f"{op}: listed in NOT_LOWERED without a reason"
                 for op, why in sorted(not_lowered.items()) if not why.strip()]
    return problems


def test_every_op_has_an_onnx_lowering_or_a_reason_why_not():
    ops = graphopt_ops()
    assert {"add", "linear", "int.linear", "token_merge", "low_rank_mlp", "opaque", "cpu.int_gemm"} <= ops
    assert coverage_problems(ops, ops_with_kernels("onnx"), NOT_LOWERED) == []


def test_the_check_fails_for_an_op_with_neither_and_for_a_listed_op_that_gained_a_lowering():
    ops = {"add", "new.op", "cpu.int_gemm"}
    assert coverage_problems(ops, {"add"}, {"cpu.int_gemm": "fused"}) == [
        "new.op: no ONNX lowering; register one (graphopt.backends.onnx.register_lowering) or list it in "
        "backends/onnx NOT_LOWERED with the reason"]
    assert coverage_problems(ops, {"add", "new.op", "cpu.int_gemm"}, {"cpu.int_gemm": "fused"}) == [
        "cpu.int_gemm: has an ONNX lowering and is still listed in NOT_LOWERED"]
    assert coverage_problems({"add"}, {"add"}, {"gone.op": "fused"}) == [
        "gone.op: listed in NOT_LOWERED but no such op is registered"]
