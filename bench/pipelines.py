"""The graphopt pipelines the benchmark runs next to its baselines.

A later pass adds its pipeline here (or from its own module, imported by ``bench/run.py``)::

    register_pipeline("token_merge r=8", ["token_merge:r=8", "cse", "dce"], backend="onnxruntime",
                      description="token merging, 8 tokens per block")

A pipeline whose passes are not registered in this checkout is listed as skipped, not run.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Pipeline:
    name: str
    passes: list
    backend: str = "onnxruntime"
    description: str = ""
    models: tuple[str, ...] | None = None  # None: every model
    needs_calibration: bool = False
    backend_options: dict = field(default_factory=dict)


PIPELINES: dict[str, Pipeline] = {}


def register_pipeline(name: str, passes, backend: str = "onnxruntime", *, description: str = "",
                      models=None, needs_calibration: bool = False, **backend_options) -> Pipeline:
    if name in PIPELINES:
        raise ValueError(f"benchmark pipeline {name!r} is already registered")
    pipeline = Pipeline(name, list(passes), backend, description, tuple(models) if models else None,
                        needs_calibration, backend_options)
    PIPELINES[name] = pipeline
    return pipeline


register_pipeline("graphopt cleanup -> ort", ["constant_folding", "cse", "dce"], "onnxruntime",
                  description="cleanup passes, lowered to ONNX and run in ONNX Runtime")
register_pipeline("graphopt cleanup -> torch", ["constant_folding", "cse", "dce"], "torch",
                  description="cleanup passes, run by the torch.fx reference backend")
