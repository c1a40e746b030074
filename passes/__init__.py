"""Passes: the registry, the pass manager, and the built-in passes."""
from graphopt.passes.manager import PassContext, PassError, PassManager
from graphopt.passes.registry import (PassConfigError, PassInfo, PassSpec, get_pass, list_passes, make_spec,
                                      option, pass_help, register_pass, register_rule_set)
from graphopt.passes.report import PassRecord, Report

__all__ = ["PassConfigError", "PassContext", "PassError", "PassInfo", "PassManager", "PassRecord", "PassSpec",
           "Report", "get_pass", "list_passes", "make_spec", "option", "pass_help", "register_pass", "register_rule_set"]
