"""Progress of graphopt.optimize: one plain line per step off a terminal, silent when turned off."""
import torch

import graphopt
from graphopt import progress
from graphopt.zoo import tiny_vit


def _optimize(capsys, **options) -> str:
    case = tiny_vit()
    capsys.readouterr()
    graphopt.optimize(case.model, ["cse", "dce"], tuple(case.args), **options)
    return capsys.readouterr().err


def test_plain_lines_per_step_when_not_a_terminal(capsys):
    err = _optimize(capsys)
    lines = err.splitlines()
    for step in ("capturing the model (torch.export)", "pass 1/2: cse", "pass 2/2: dce",
                 "lowering to the torch backend"):
        assert f"graphopt: {step} ..." in lines
        assert any(l.startswith(f"graphopt: {step}: done (") for l in lines), step
    # a step ends after it starts, and the passes run in order
    assert lines.index("graphopt: pass 1/2: cse ...") < lines.index("graphopt: pass 2/2: dce ...")


def test_turned_off_by_argument_or_environment(capsys, monkeypatch):
    assert _optimize(capsys, progress=False) == ""
    monkeypatch.setenv(progress.ENV, "0")
    assert _optimize(capsys) == ""


def test_calibration_reports_its_batches(capsys):
    case = tiny_vit()
    graph = graphopt.optimize(case.model, [], tuple(case.args), progress=False).graph
    x = case.args[0]
    calib = [(torch.randn_like(x),) for _ in range(3)]
    capsys.readouterr()
    with progress.showing(True):
        from graphopt.passes.calibration import collect_stats
        collect_stats(graph, [tuple(b) for b in calib], graph.inputs)
    assert "over 3 batches ..." in capsys.readouterr().err


def test_silent_outside_optimize(capsys):
    with progress.task("a step nobody shows") as advance:
        advance()
    assert capsys.readouterr().err == ""


def test_optimize_shows_its_progress_option_in_its_signature():
    import inspect

    import graphopt
    param = inspect.signature(graphopt.optimize).parameters["progress"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None
