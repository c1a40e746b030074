"""graphopt's IR: typed SSA graphs with symbolic shapes, an op registry, and a verifier."""
from graphopt.ir.graph import Graph, GraphError, Node, OpBuilder, Value
from graphopt.ir.opdef import Attr, OpError, OpSchema, get_op, list_ops, register_op
from graphopt.ir import ops  # noqa: F401  (registers the built-in ops)
from graphopt.ir.compare import assert_structurally_equal, structural_diff
from graphopt.ir.ops.rules import broadcast, same_as_input
from graphopt.ir.parser import ParseError
from graphopt.ir.printer import format_graph
from graphopt.ir.types import Dim, TensorType
from graphopt.ir.verifier import VerificationError, verify

__all__ = ["assert_structurally_equal", "structural_diff", "Attr", "Dim", "Graph", "GraphError", "Node", "OpBuilder", "OpError", "OpSchema", "ParseError", "TensorType",
           "Value", "VerificationError", "broadcast", "format_graph", "get_op", "list_ops", "register_op",
           "same_as_input", "verify"]
