"""Rewrite rules: a pattern, a check that can fail with a reason, and a rewrite.

    rule = Rule("linear_gelu", pattern, rewrite, check)
    counts = RuleSet("fusions", [rule]).apply(graph)       # {"linear_gelu": 12}
    print(why_not(graph, rule))                           # best partial match and why it failed

``check(ctx, **variables)`` returns True/None to accept, or ``ctx.fail("why")``. ``rewrite(op,
**variables)`` builds the replacement with the graph's op builder (inserted before the matched
root) and returns the value that replaces the root's output; a rewrite that declares a ``nodes``
parameter also gets the matched nodes, root first (to read their attributes). A match whose inner values are also
used outside the match is refused: rewriting it would cut them.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

from graphopt.ir.graph import Graph, Node, Value
from graphopt.ir.pattern import Binding, Pattern, Progress, match, variables_of


class Failure:
    """A failed check; falsy, carries the reason."""

    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self) -> bool:
        return False


class CheckContext:
    def __init__(self, binding: Binding, graph: Graph):
        self.binding = binding
        self.graph = graph

    @property
    def nodes(self) -> list[Node]:
        return self.binding.matched_nodes

    def fail(self, reason: str) -> Failure:
        return Failure(reason)


@dataclass
class Rule:
    name: str
    pattern_fn: Callable
    rewrite_fn: Callable
    check_fn: Callable | None = None

    def __post_init__(self):
        self.pattern = Pattern.from_function(self.pattern_fn)
        self._wants_nodes = "nodes" in inspect.signature(self.rewrite_fn).parameters
        doc = (self.rewrite_fn.__doc__ or self.pattern_fn.__doc__ or "").strip()
        self.doc = doc.splitlines()[0] if doc else ""

    def try_node(self, graph: Graph, node: Node, progress: Progress) -> Binding | None:
        """The first binding rooted at ``node`` that passes the check and cuts nothing."""
        for out in node.outputs:
            for binding in match(self.pattern.root, out, Binding(), progress, node):
                reason = self._refusal(graph, binding, out)
                if reason is None:
                    return binding
                progress.record(binding, reason, node)
        return None

    def _refusal(self, graph: Graph, binding: Binding, root_value) -> str | None:
        root = root_value.producer
        matched = {id(n) for n in binding.matched_nodes}
        outputs = {id(v) for v in graph.outputs}
        for n in binding.matched_nodes:
            if n is root:
                continue
            for v in n.outputs:
                outside = [u for u in v.users if id(u) not in matched]
                if outside or id(v) in outputs:
                    who = outside[0].label() if outside else "the graph's outputs"
                    return f"the match would cut %{v.name}, which {who} also uses"
        if self.check_fn is not None:
            verdict = self.check_fn(CheckContext(binding, graph), **variables_of(self.pattern, binding))
            if verdict is False or isinstance(verdict, Failure):
                return f"check failed: {getattr(verdict, 'reason', 'returned False')}"
        return None

    def apply_at(self, graph: Graph, node: Node, binding: Binding) -> Value:
        root_value = next(v for v in node.outputs if any(n is node for n in binding.matched_nodes))
        variables = variables_of(self.pattern, binding)
        if self._wants_nodes:
            variables["nodes"] = binding.matched_nodes
        with graph.inserting_before(node):
            replacement = self.rewrite_fn(graph.op, **variables)
        graph.replace_all_uses_with(root_value, replacement)
        pending = [n for n in binding.matched_nodes if n.graph is graph]
        outputs = {id(v) for v in graph.outputs}
        while pending:  # erase users before producers; only the match's own nodes are visited
            dead = [n for n in pending if not any(v.uses or id(v) in outputs for v in n.outputs)]
            if not dead:
                break
            for n in dead:
                graph.erase_node(n)
            pending = [n for n in pending if n.graph is graph]
        return replacement


_RULES: dict[str, Rule] = {}


class RuleSet:
    """Rules applied together; ``apply`` sweeps the graph until no rule fires (bounded)."""

    def __init__(self, name: str, rules: Sequence[Rule]):
        self.name = name
        self.rules = list(rules)
        for rule in self.rules:
            _RULES.setdefault(rule.name, rule)

    def apply(self, graph: Graph, max_sweeps: int = 8,
              on_fire: Callable[[Rule, list[Node], Value], None] | None = None) -> dict[str, int]:
        """Counts of firings per rule; ``on_fire(rule, matched nodes, replacement)`` hears each one."""
        counts = {rule.name: 0 for rule in self.rules}
        for _ in range(max_sweeps):
            fired = 0
            by_op: dict[str, list[Node]] = {}
            for node in graph.nodes:
                by_op.setdefault(node.op, []).append(node)
            for rule in self.rules:
                for op in sorted(rule.pattern.root_ops()):
                    for node in by_op.get(op, []):
                        if node.graph is not graph:
                            continue  # erased by an earlier rewrite in this sweep
                        binding = rule.try_node(graph, node, Progress())
                        if binding is not None:
                            matched = binding.matched_nodes
                            replacement = rule.apply_at(graph, node, binding)
                            if on_fire is not None:
                                on_fire(rule, matched, replacement)
                            counts[rule.name] += 1
                            fired += 1
            if not fired:
                break
        return counts


def get_rule(name: str) -> Rule:
    if name not in _RULES:
        close = difflib.get_close_matches(name, list(_RULES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown rule {name!r}{hint}; known rules: {sorted(_RULES)}")
    return _RULES[name]


def list_rules() -> list[str]:
    return sorted(_RULES)


def why_not(graph: Graph, rule: Rule | str) -> str:
    """Where the rule would fire, or its best partial match and the reason it failed."""
    rule = get_rule(rule) if isinstance(rule, str) else rule
    candidates = [n for n in graph.nodes if n.op in rule.pattern.root_ops()]
    if not candidates:
        return f"rule {rule.name}: no {' or '.join(sorted(rule.pattern.root_ops()))} node in the graph, so nothing to match"
    best, best_node, hits = Progress(), None, []
    for node in candidates:
        progress = Progress()
        if rule.try_node(graph, node, progress) is not None:
            hits.append(node)
        elif progress.matched > best.matched:
            best, best_node = progress, node
    if hits:
        return f"rule {rule.name}: matches at {len(hits)} node(s): " + ", ".join(n.label() for n in hits[:10])
    total = rule.pattern.size()
    where = f" at {best.at.label()}" if best.at is not None else ""
    return (f"rule {rule.name}: did not match. Best partial match rooted at {best_node.label()} "
            f"matched {max(best.matched, 0)} node(s) of the pattern ({total} pattern values); "
            f"it failed{where}: {best.reason}")


def why_not_at(graph: Graph, node: Node, rules: Sequence[Rule]) -> str | None:
    """Why no rule rooted at ``node``'s op fires there (the deepest partial match's reason), or None
    when one would. Rules later in the list win ties: they are the more general ones."""
    best = None
    for rule in rules:
        if node.op not in rule.pattern.root_ops():
            continue
        progress = Progress()
        if rule.try_node(graph, node, progress) is not None:
            return None
        if best is None or progress.matched >= best[0]:
            best = (progress.matched, f"{rule.name}: {progress.reason}")
    return best[1] if best else None
