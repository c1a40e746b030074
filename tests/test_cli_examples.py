"""Every pass string the documentation shows (README.md, opt-cli --help, the bench scripts) names a
registered pass with valid options, so an example cannot go stale when a pass is renamed."""
import ast
import re
from pathlib import Path

import pytest

from graphopt.cli import build_parser
from graphopt.passes import get_pass, make_spec

ROOT = Path(__file__).resolve().parent.parent
PASS_ARGUMENT = re.compile(r"(?:\s-p|--pass)\s+(\"[^\"]*\"|'[^']*'|[^\s\"'|)]+)")  # -p X on a command line
EXPLAIN_ARGUMENT = re.compile(r"--explain\s+([a-z][\w.]*)")
SPEC_WITH_OPTIONS = re.compile(r"^[a-z][\w.]*:\w+=")  # "name:opt=value...": a pass string, not some other text
QUOTED = re.compile(r"(?<![\w{])\"([a-z][\w.]*:\w+=[^\"]*)\"")  # quoted, not an f-string's text
OPTIMIZE_LIST = re.compile(r"(?:optimize|register_pipeline)\([^,()]+,\s*(?:passes=)?\[([^\]]*)\]")
SYNTAX_PLACEHOLDER = "name:"  # "name:opt=value,opt2=value" explains the syntax; it names no pass


def _from_text(text: str) -> list[str]:
    commands = "\n".join(line for line in text.splitlines() if line.strip().startswith("opt-cli "))
    found = [m.strip("\"'") for m in PASS_ARGUMENT.findall(commands)]
    found += QUOTED.findall(text)
    for items in OPTIMIZE_LIST.findall(text):   # a ("name", {options}) item: the name, not the option keys
        found += re.findall(r"\"([^\"]*)\"", re.sub(r"\{[^{}]*\}", "", items))
    return [s for s in found if not s.startswith(SYNTAX_PLACEHOLDER)]


def _literal(node) -> str | None:
    """A string literal's text; an f-string's with each placeholder as 8 (r={r} -> r=8)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = [p.value if isinstance(p, ast.Constant) else "8" for p in node.values]
        return "".join(parts)
    return None


def _from_python(source: str) -> list[str]:
    """Pass strings in a script: literals shaped "name:opt=value", and every string of a list that holds
    one (such a list is a pipeline: ["integer_only", "token_merge:r=8"]); docstrings read as text."""
    found = _from_text(source)
    tree = ast.parse(source)
    f_string_parts = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        if id(node) in f_string_parts:
            continue
        if isinstance(node, (ast.List, ast.Tuple)):
            texts = [_literal(e) for e in node.elts]
            if all(t is not None for t in texts) and any(SPEC_WITH_OPTIONS.match(t) for t in texts):
                found += texts
        text = _literal(node)
        if text is not None and SPEC_WITH_OPTIONS.match(text):
            found.append(text)
    return found


def _examples() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    examples = [("README.md", s) for s in _from_text(readme)]
    examples += [("README.md --explain", s) for s in EXPLAIN_ARGUMENT.findall(readme)]
    help_text = build_parser().format_help()
    examples += [("opt-cli --help", s) for s in _from_text(help_text)]
    examples += [("opt-cli --help --explain", s) for s in EXPLAIN_ARGUMENT.findall(help_text)]
    for script in sorted((ROOT / "bench").glob("*.py")):
        examples += [(f"bench/{script.name}", s) for s in _from_python(script.read_text())]
    return sorted(set(examples))


EXAMPLES = _examples()


def test_the_examples_are_found():
    """The extraction sees the known examples (an extractor that finds nothing would pass anything)."""
    places = {place for place, _ in EXAMPLES}
    assert {"README.md", "opt-cli --help", "bench/token_reduction.py", "bench/pipelines.py"} <= places, places
    assert ("opt-cli --help", "token_merge:r=8") in EXAMPLES
    assert ("bench/token_reduction.py", "token_merge:r=8,schedule=linear") in EXAMPLES


@pytest.mark.parametrize("place, example", EXAMPLES, ids=[f"{p}: {s}" for p, s in EXAMPLES])
def test_every_pass_example_parses(place, example):
    if " --explain" in place:
        get_pass(example)
    else:
        make_spec(example)


def test_a_stale_example_would_be_caught():
    """The check itself: a renamed pass in an example fails make_spec."""
    stale = _from_text('opt-cli model.onnx -o out.onnx -p "tom:r=8"')
    assert set(stale) == {"tom:r=8"}
    with pytest.raises(Exception, match="unknown pass 'tom'"):
        make_spec(stale[0])
