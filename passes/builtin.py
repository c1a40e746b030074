"""Imports every built-in pass module so each registers itself."""
from graphopt.passes import dce  # noqa: F401
