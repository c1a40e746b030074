"""Imports every built-in pass module so each registers itself."""
from graphopt.passes import constant_folding, cse, dce, decompose_attention  # noqa: F401
