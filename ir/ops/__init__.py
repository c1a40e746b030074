"""The built-in op set. Importing this package registers every built-in op."""
from graphopt.ir.ops import elementwise, nn, opaque, shape  # noqa: F401  (registration side effects)
