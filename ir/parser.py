"""Read the printer's text form back into a Graph (``Graph.parse``), so tests and bug reports
can write graphs as text, as MLIR and TVM tests do.

    graph main(%x: f32[batch,8], %w: f32[16,8]) {
      %half: f32[] = constant(0.5)
      %big: f32[16,16] = constant              # its tensor comes from parse(text, constants={"big": ...})
      %0: f32[batch,16] = linear(%x, %w, None)
      %1: f32[batch,16] = mul(%0, %half)
      return %1
    }

Values are defined before use; every node goes through the op registry, and its declared
output types must be the ones its op infers. Attribute values: ints, floats (``1e-05``, ``inf``,
``nan``), ``True`` / ``False`` / ``None``, quoted strings, dtypes (``f32``), tensor types
(``f32[batch,4]``), dims (``batch``, ``2*batch``, ``floor(tokens/2)``), lists ``[...]``, dicts
``{key:value}`` and opaque-argument slots (``$0``). Nothing is evaluated: dims are built from a
fixed set of sympy functions. A ``#`` starts a comment. Errors give the line and column and
what was expected there.
"""
from __future__ import annotations

import json
import math
import re
from typing import Mapping

import sympy
import torch

from graphopt.ir.graph import Graph, GraphError, Value
from graphopt.ir.opdef import OpError, get_op
from graphopt.ir.types import DTYPES_BY_NAME, TensorType, canonical_dim, symbol
from graphopt.ir.verifier import verify

_DIM_FUNCTIONS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Max": sympy.Max, "Min": sympy.Min,
                  "Mod": sympy.Mod}
_TORCH_ENUMS = (torch.layout, torch.memory_format)
_BINARY_LEVELS = (("+", "-"), ("*", "/"))
_SHOWN_CHARS = 120  # of a long source line, an error shows this many characters around the column
_MAX_EXPONENT = 64  # x**n in a dim: larger powers are not dims, and building them could take long
_TOKEN = re.compile(r"""
    (?P<space>[ \t\r]+|\#[^\n]*)
  | (?P<newline>\n)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<name>%(?:[A-Za-z0-9_./\-]+|"(?:[^"\\\n]|\\.)*"))
  | (?P<slot>\$[0-9]+)
  | (?P<number>[0-9]+(?:\.[0-9]*)?(?:[eE][+\-]?[0-9]+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*(?:(?:\.|::)[A-Za-z0-9_]+)*)
  | (?P<punct>\*\*|[()\[\]{},:=*/+\-])
""", re.VERBOSE)


class ParseError(ValueError):
    """Text that is not a graph in the printer's form; names the line and column."""

    def __init__(self, message: str, line: int, column: int, source_line: str = ""):
        self.line, self.column = line, column
        start = max(0, column - 1 - _SHOWN_CHARS // 2) if len(source_line) > _SHOWN_CHARS else 0
        shown = source_line[start:start + _SHOWN_CHARS]
        where = f"\n  {shown}\n  {' ' * (column - 1 - start)}^" if shown else ""
        super().__init__(f"line {line}, column {column}: {message}{where}")


class _Token:
    __slots__ = ("kind", "text", "line", "column")

    def __init__(self, kind: str, text: str, line: int, column: int):
        self.kind, self.text, self.line, self.column = kind, text, line, column

    def describe(self) -> str:
        return "the end of the text" if self.kind == "end" else "a line break" if self.kind == "newline" \
            else repr(self.text)


def _tokens(text: str) -> list[_Token]:
    tokens, line, line_start, pos = [], 1, 0, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r}", line, pos - line_start + 1,
                             text.splitlines()[line - 1] if text.splitlines() else "")
        if m.lastgroup != "space":
            tokens.append(_Token(m.lastgroup, m.group(), line, pos - line_start + 1))
        if m.lastgroup == "newline":
            line, line_start = line + 1, m.end()
        pos = m.end()
    tokens.append(_Token("end", "", line, pos - line_start + 1))
    return tokens


def parse_graph(text: str, constants: Mapping[str, torch.Tensor] | None = None) -> Graph:
    """The graph ``text`` describes (the form ``print(graph)`` writes). Constants printed by name
    (``%w: f32[16,8] = constant``) take their tensors from ``constants``, which must name no other."""
    parser = _Parser(text, dict(constants or {}))
    try:
        return parser.graph()
    except RecursionError:
        parser.fail("brackets or parentheses nest too deeply")


class _Parser:
    def __init__(self, text: str, constants: dict[str, torch.Tensor]):
        self.lines = text.splitlines()
        self.tokens = _tokens(text)
        self.pos = 0
        self.given = constants
        self.values: dict[str, Value] = {}

    # ---- tokens --------------------------------------------------------------------------------
    @property
    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def next(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def at(self, text: str) -> bool:
        return self.peek.kind in ("punct", "word") and self.peek.text == text

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.pos += 1
            return True
        return False

    def expect(self, text: str, what: str = "") -> _Token:
        if not self.at(text):
            self.fail(f"expected {what or repr(text)}, found {self.peek.describe()}")
        return self.next()

    def expect_kind(self, kind: str, what: str) -> _Token:
        if self.peek.kind != kind:
            self.fail(f"expected {what}, found {self.peek.describe()}")
        return self.next()

    def skip_newlines(self) -> None:
        while self.peek.kind == "newline":
            self.pos += 1

    def end_of_line(self) -> None:
        if self.peek.kind not in ("newline", "end"):
            self.fail(f"expected the end of the line, found {self.peek.describe()}")
        self.skip_newlines()

    def fail(self, message: str, token: _Token | None = None):
        token = token or self.peek
        source = self.lines[token.line - 1] if token.line <= len(self.lines) else ""
        raise ParseError(message, token.line, token.column, source)

    # ---- the graph -----------------------------------------------------------------------------
    def graph(self) -> Graph:
        self.skip_newlines()
        header = self.expect("graph", "'graph NAME(inputs) {'")
        token = self.next()
        if token.kind not in ("word", "string", "number"):
            self.fail(f"expected the graph's name, found {token.describe()}", token)
        g = Graph(self.string(token.text, token) if token.kind == "string" else token.text)
        self.expect("(")
        while not self.accept(")"):
            if g.inputs:
                self.expect(",", "',' or ')' after a graph input")
            name_token = self.peek
            name, type_ = self.declaration()
            self.define(name, g.add_input(name, type_), name_token)
        self.expect("{")
        self.end_of_line()
        while not self.at("return"):
            if self.peek.kind == "end":
                self.fail("expected a node, a constant or 'return', found the end of the text")
            self.statement(g)
        self.next()
        outputs = []
        while self.peek.kind == "name":
            outputs.append(self.use())
            if not self.accept(","):
                break
        self.end_of_line()
        self.expect("}", "'}' closing the graph")
        self.skip_newlines()
        if self.peek.kind != "end":
            self.fail(f"expected the end of the text after '}}', found {self.peek.describe()}")
        g.set_outputs(outputs)
        unused = sorted(set(self.given) - set(g.constants))
        if unused:
            self.fail(f"constants= gives {', '.join('%' + n for n in unused)}, which the text does not declare "
                      f"as '= constant'", header)
        verify(g)
        return g

    def declaration(self) -> tuple[str, TensorType]:
        name = self.value_name(self.expect_kind("name", "a value name like %x"))
        self.expect(":", f"':' and the type of %{name}")
        return name, self.tensor_type()

    def statement(self, g: Graph) -> None:
        first = self.peek
        declared = [self.declaration()]
        while self.accept(","):
            declared.append(self.declaration())
        self.expect("=")
        op_token = self.expect_kind("word", "an op name or 'constant'")
        if op_token.text == "constant":
            if len(declared) != 1:
                self.fail("a constant defines one value", first)
            self.constant(g, *declared[0], first)
        else:
            self.node(g, op_token, declared, first)
        self.end_of_line()

    def constant(self, g: Graph, name: str, type_: TensorType, where: _Token) -> None:
        if not type_.is_static:
            self.fail(f"constant %{name} has the symbolic type {type_}; a constant's shape is fixed", where)
        if self.accept("("):
            if name in self.given:
                self.fail(f"constant %{name} has a value in the text and in constants=; give it once", where)
            literal_token = self.peek
            tensor = self.tensor_literal(type_, literal_token)
            self.expect(")")
        elif name in self.given:
            tensor = self.given[name]
            if not isinstance(tensor, torch.Tensor) or not TensorType.of(tensor).matches(type_):
                got = TensorType.of(tensor) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                self.fail(f"constants={name!r} is {got}, but the text declares %{name}: {type_}", where)
        else:
            self.fail(f"constant %{name} has no value: write it inline, constant([...]), or pass it as "
                      f"constants={{{name!r}: tensor}}", where)
        self.define(name, g.add_constant(tensor, name), where)

    def tensor_literal(self, type_: TensorType, where: _Token) -> torch.Tensor:
        values = self.attr_value(top=False)
        if values == [] and type_.numel() == 0:
            return torch.empty(type_.shape, dtype=type_.dtype)
        try:
            tensor = torch.tensor(values, dtype=type_.dtype)
        except (TypeError, ValueError, RuntimeError) as e:
            self.fail(f"not a {type_} tensor literal: {e}", where)
        if tuple(tensor.shape) != type_.shape:
            self.fail(f"the literal has shape {list(tensor.shape)}, but the type is {type_}", where)
        return tensor

    def node(self, g: Graph, op_token: _Token, declared: list[tuple[str, TensorType]], where: _Token) -> None:
        try:
            schema = get_op(op_token.text)
        except OpError as e:
            self.fail(str(e), op_token)
        if op_token.text == "onnx_opaque":
            self.fail("onnx_opaque nodes are printed for reading only: their attributes are ONNX protobuf bytes "
                      "the text does not hold; load the model with from_onnx (or save the graph with save_graph)",
                      op_token)
        self.expect("(", f"'(' after {op_token.text}")
        inputs: list[Value | None] = []
        attrs: dict = {}
        attr_tokens: dict[str, _Token] = {}
        while not self.accept(")"):
            if inputs or attrs:
                self.expect(",", "',' or ')' in the argument list")
            if self.peek.kind == "name":
                if attrs:
                    self.fail("an input after attributes: inputs come first")
                inputs.append(self.use())
            elif self.accept("None"):
                inputs.append(None)
            elif self.peek.kind == "word" and self.tokens[self.pos + 1].text == "=":
                key = self.next()
                self.next()
                if key.text in attrs:
                    self.fail(f"attribute {key.text} is given twice", key)
                attr_tokens[key.text] = self.peek
                attrs[key.text] = self.attr_value(top=True)
                spec = schema.attrs.get(key.text)
                if spec is not None and spec.kind == "str" and isinstance(attrs[key.text], sympy.Symbol):
                    self.fail(f"{op_token.text}: attribute {key.text} is a string; write it in quotes: "
                              f"{key.text}=\"{attrs[key.text]}\"", attr_tokens[key.text])
            else:
                self.fail(f"expected an input (%name or None) or an attribute (name=value), found {self.peek.describe()}")
        try:
            node = g.create_node(op_token.text, inputs, attrs, names=[name for name, _ in declared])
        except (OpError, GraphError, TypeError, ValueError) as e:
            message = str(e)
            self.fail(message if message.startswith(op_token.text) else f"{op_token.text}: {message}", op_token)
        if len(node.outputs) != len(declared):
            self.fail(f"{op_token.text} has {len(node.outputs)} output(s), the line declares {len(declared)}", where)
        for (name, type_), value in zip(declared, node.outputs):
            if not value.type.matches(type_):
                self.fail(f"%{name} is declared {type_}, but {op_token.text} gives {value.type}", where)
            self.define(name, value, where)

    # ---- values --------------------------------------------------------------------------------
    def value_name(self, token: _Token) -> str:
        text = token.text[1:]
        return self.string(text, token) if text.startswith('"') else text

    def string(self, literal: str, token: _Token) -> str:
        """A quoted string, with JSON's escapes (what the printer writes)."""
        try:
            return json.loads(literal)
        except ValueError as e:
            self.fail(f"bad string {literal}: {e.msg}", token)

    def define(self, name: str, value: Value, where: _Token) -> None:
        if name in self.values or value.name != name:
            self.fail(f"%{name} is defined twice", where)
        self.values[name] = value

    def use(self) -> Value:
        token = self.next()
        name = self.value_name(token)
        if name not in self.values:
            self.fail(f"%{name} is used before it is defined", token)
        return self.values[name]

    def tensor_type(self) -> TensorType:
        token = self.expect_kind("word", "a tensor type like f32[batch,8]")
        if token.text not in DTYPES_BY_NAME:
            self.fail(f"unknown dtype {token.text!r}; one of {', '.join(DTYPES_BY_NAME)}", token)
        self.expect("[", f"'[' and the dims of the {token.text} tensor")
        dims = []
        while not self.accept("]"):
            if dims:
                self.expect(",", "',' or ']' in the dims")
            dims.append(self.dim())
        return TensorType(DTYPES_BY_NAME[token.text], tuple(dims))

    def dim(self):
        token = self.peek
        value = self.expression()
        if isinstance(value, float) or (isinstance(value, sympy.Expr) and value.is_integer is False):
            self.fail(f"a dim must be an integer expression, got {value}", token)
        return canonical_dim(value)

    def attr_value(self, top: bool):
        """One attribute value; lists at the top are tuples (the IR's attribute form), nested ones lists."""
        token = self.peek
        if self.accept("["):
            items = []
            while not self.accept("]"):
                if items:
                    self.expect(",", "',' or ']' in the list")
                items.append(self.attr_value(top=False))
            return tuple(items) if top else items
        if self.accept("{"):
            items = {}
            while not self.accept("}"):
                if items:
                    self.expect(",", "',' or '}' in the dict")
                key_token = self.peek
                key = self.next().text if key_token.kind == "word" else self.attr_value(top=False)
                self.expect(":", "':' after a dict key")
                items[key] = self.attr_value(top=False)
            return items
        if token.kind == "string":
            self.next()
            return self.string(token.text, token)
        if token.kind == "slot":
            from graphopt.ir.ops.opaque import TensorArg
            self.next()
            return TensorArg(int(token.text[1:]))
        if token.kind == "word":
            if token.text in ("None", "True", "False"):
                self.next()
                return {"None": None, "True": True, "False": False}[token.text]
            if token.text in DTYPES_BY_NAME:
                if self.tokens[self.pos + 1].text == "[":
                    return self.tensor_type()
                self.next()
                return DTYPES_BY_NAME[token.text]
            if token.text.startswith("torch."):
                self.next()
                enum = getattr(torch, token.text[len("torch."):], None)
                if not isinstance(enum, _TORCH_ENUMS):
                    self.fail(f"{token.text} is not a torch layout or memory format", token)
                return enum
        if token.kind in ("word", "number") or self.at("-") or self.at("("):
            value = self.expression()
            return canonical_dim(value) if isinstance(value, sympy.Expr) else value
        self.fail(f"expected an attribute value, found {token.describe()}")

    # ---- numbers and dims: + - * / ** over ints, floats, symbols and floor/ceiling/Max/Min/Mod ----
    def expression(self, level: int = 0):
        """Binary operators by precedence: ``+ -`` (level 0) bind looser than ``* /`` (level 1)."""
        if level == len(_BINARY_LEVELS):
            return self.unary()
        value = self.expression(level + 1)
        while self.peek.kind == "punct" and self.peek.text in _BINARY_LEVELS[level]:
            op = self.next().text
            value = self.arith(op, value, self.expression(level + 1))
        return value

    def unary(self):
        if self.accept("-"):
            return self.arith("neg", self.unary(), None)
        if self.accept("+"):
            return self.unary()
        base = self.atom()
        if self.accept("**"):
            return self.arith("**", base, self.unary())
        return base

    def atom(self):
        token = self.next()
        if token.kind == "number":
            return int(token.text) if token.text.isdigit() else float(token.text)
        if token.kind == "punct" and token.text == "(":
            value = self.expression()
            self.expect(")", "')' closing the parenthesis")
            return value
        if token.kind == "word" and token.text in ("inf", "nan"):
            return math.inf if token.text == "inf" else math.nan
        if token.kind == "word" and token.text in _DIM_FUNCTIONS and self.at("("):
            self.next()
            args = [self.expression()]
            while self.accept(","):
                args.append(self.expression())
            self.expect(")", f"')' closing {token.text}(...)")
            return _DIM_FUNCTIONS[token.text](*[sympy.sympify(a) for a in args])
        if token.kind == "word" and token.text.isidentifier():
            return symbol(token.text)
        self.fail(f"expected a number or a dim, found {token.describe()}", token)

    def arith(self, op: str, a, b):
        """A plain number stays a Python number under a minus sign (``-1`` is the int -1, ``-inf`` a
        float); anything else is computed in sympy, so canonical_dim makes integers ints again."""
        if op == "neg":
            return -a
        a, b = sympy.sympify(a), sympy.sympify(b)
        if op == "**" and not (b.is_Rational and abs(b.p) <= _MAX_EXPONENT and abs(b.q) <= _MAX_EXPONENT):
            self.fail(f"a dim power needs a small rational exponent, got {b}", self.tokens[self.pos - 1])
        return {"+": a + b, "-": a - b, "*": a * b, "/": a / b, "**": a ** b}[op]
