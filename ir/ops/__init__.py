"""The built-in op set. Importing this package registers every built-in op."""
from graphopt.ir.ops import elementwise, nn, opaque, shape  # noqa: F401  (registration side effects)
from graphopt.ir.ops import onnx_opaque  # noqa: F401  (ONNX ops the IR does not know)
from graphopt.ir.ops import integer  # noqa: F401  (integer-only ops, passes/integer_only/)
from graphopt.ir.ops import low_rank  # noqa: F401  (the fused low-rank MLP op)
from graphopt.ir.ops import acm  # noqa: F401  (adaptive computation modules, passes/acm.py)
from graphopt.ir.ops import tokens  # noqa: F401  (token merging / dropping ops)
from graphopt.ir.ops import integer_tokens  # noqa: F401  (integer token merging, passes/integer_only/tokens.py)
from graphopt.ir.ops import sparse  # noqa: F401  (the sparse-weight linear op, passes/sparsify.py)
