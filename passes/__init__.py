"""Passes: the registry, the pass manager, and the built-in passes."""
from __future__ import annotations

from typing import Sequence


class PassError(Exception):
    """A pass failed; the graph was left as it was before the pass."""

    def __init__(self, spec: PassSpec, message: str, earlier: Sequence[str], node=None):
        self.pass_name = spec.name
        self.node = node
        ran = f"; passes before it: {', '.join(earlier)}" if earlier else ""
        super().__init__(f"pass {spec}: {message} (graph restored to its state before this pass{ran})")


class CalibrationMissing(PassError):
    """A pass that calibrates was given no calibration data: the caller's omission (opt-cli exits 2, usage)."""


from graphopt.passes.manager import PassContext, PassManager  # noqa: E402  (they raise PassError)
from graphopt.passes.registry import (PassConfigError, PassInfo, PassSpec, get_pass, list_passes, make_spec,
                                      option, pass_help, register_pass, register_rule_set)
from graphopt.passes.report import PassRecord, Report

__all__ = ["CalibrationMissing", "PassConfigError", "PassContext", "PassError", "PassInfo", "PassManager",
           "PassRecord", "PassSpec", "Report", "get_pass", "list_passes", "make_spec", "option", "pass_help",
           "register_pass", "register_rule_set"]
