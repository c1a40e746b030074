"""The kernel layer every backend builds on: a table (op or fused pattern, target) -> kernel.

A **kernel** implements one IR op on one target (``torch``, ``onnx``, ``cpu_integer``, ``triton``,
or a plugin's own). Its ``supports(node)`` returns None or the reason it cannot take that node, so a
backend that leaves a node on the reference ops can say why. Several kernels may serve the same
(target, op); the first registered that supports the node wins, the reference implementation is
the fallback where the target allows one.

A **fusion** is a rewrite rule (``ir/rewrite``) that turns a chain of ops into one op that a kernel
implements (``int.linear -> int.requant`` into ``cpu.int_gemm``). A backend applies its target's
fusion rules first; ``why_not(graph, rule)`` then explains a chain left unfused, and the backend's
report comes from the rules' counts and those reasons.

    @register_kernel("torch", "low_rank_mlp")
    def low_rank_mlp(x, v1, u1, b1, v2, u2, b2, *, activation, tile): ...

    register_fusion("cpu_integer", Rule("gemm_requant", pattern, rewrite, check))

Plugins register kernels and fusions from their own packages (entry-point group ``graphopt.kernels``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from graphopt.ir import Graph, Node
from graphopt.ir.registry import Registry
from graphopt.ir.rewrite import Rule, RuleSet


def _always(node: Node) -> None:
    return None


@dataclass(frozen=True)
class Kernel:
    target: str
    op: str
    fn: Callable
    supports: Callable[[Node], str | None] = _always
    name: str = ""

    def why_not(self, node: Node) -> str | None:
        """None when this kernel can run ``node``, else the reason."""
        return self.supports(node)


KERNELS: Registry[Kernel] = Registry("kernel", group="graphopt.kernels")
FUSIONS: Registry[tuple[str, Rule, int]] = Registry("fusion", group="graphopt.kernels")


def register_kernel(target: str, op: str, *, supports: Callable[[Node], str | None] | None = None,
                    name: str | None = None, replace: bool = False):
    """Decorator: ``fn`` runs op ``op`` on ``target``; ``supports(node)`` returns None or why not."""
    def wrap(fn: Callable) -> Callable:
        kernel_name = name or getattr(fn, "__name__", op)
        KERNELS.register(f"{target}:{op}:{kernel_name}",
                         Kernel(target, op, fn, supports or _always, kernel_name), replace=replace,
                         owner=getattr(fn, "__module__", None))
        return fn
    return wrap


def register_fusion(target: str, rule: Rule, *, priority: int = 0, replace: bool = False) -> Rule:
    """A rewrite rule the ``target`` backend applies before selecting kernels. Higher ``priority``
    rules are tried first (a special case before the general one); equal ones in registration order."""
    FUSIONS.register(f"{target}:{rule.name}", (target, rule, priority), replace=replace,
                     owner=getattr(rule.rewrite_fn, "__module__", None))
    return rule


def kernels(target: str, op: str) -> list[Kernel]:
    """Every kernel of ``op`` on ``target``, in registration order."""
    return [k for k in KERNELS.values() if k.target == target and k.op == op]


def ops_with_kernels(target: str) -> set[str]:
    return {k.op for k in KERNELS.values() if k.target == target}


def select(target: str, node: Node) -> tuple[Kernel | None, list[str]]:
    """The first kernel of ``target`` that supports ``node``, and the reasons of those that refused."""
    reasons = []
    for kernel in kernels(target, node.op):
        why = kernel.why_not(node)
        if why is None:
            return kernel, reasons
        reasons.append(f"{kernel.name}: {why}")
    return None, reasons or [f"no {target} kernel implements {node.op}"]


def fusion_rules(target: str) -> RuleSet:
    chosen = [(priority, rule) for t, rule, priority in FUSIONS.values() if t == target]
    return RuleSet(f"{target} fusions", [rule for _, rule in sorted(chosen, key=lambda pr: -pr[0])])
