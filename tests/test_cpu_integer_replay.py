"""Replaying a cpu_integer forward from its recorded kernel calls (``cpu_integer_replay``).

References: the same executable's fx graph run (``replay=False``) bit for bit on new inputs of a captured shape,
outputs of earlier calls unchanged, a hand-checked arena layout, and forwards that cannot be replayed running as
they are with the reason."""
from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.backends import cpu_integer_library as kernels
from graphopt.backends import cpu_integer_tokens as tokens
from graphopt.backends.cpu_integer_replay import Replay, _Buffer, _Calls, _lay_out
from graphopt.backends.registry import lower
from tests.tiny_models import padded_ids, tiny_bert

try:
    kernels.library()
except kernels.KernelBuildError as e:       # no C compiler on this machine
    pytest.skip(str(e), allow_module_level=True)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


def _replays_like_the_graph(graph, feeds):
    """Each feed (positional inputs, or keyword inputs) through the replaying executable and the fx graph alone: identical, and earlier outputs keep
    their values while later calls reuse the arena. Returns the replaying executable."""
    ex, plain = lower(graph, "cpu_integer", threads=2), lower(graph, "cpu_integer", threads=2, replay=False)
    kept = []
    with torch.inference_mode():
        for feed in feeds:
            args, kwargs = (feed, {}) if isinstance(feed, tuple) else ((), feed)
            got, want = _first(ex(*args, **kwargs)), _first(plain(*args, **kwargs))
            assert torch.equal(got, want)
            kept.append((got, want.clone()))
    assert all(torch.equal(got, want) for got, want in kept)
    assert not ex.replay.refused, ex.replay.refused
    return ex


def test_vit_with_token_merge_replays_bit_identically():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=4, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(2)]
    graph = graphopt.optimize(model, [("integer_only", {"smoothquant": 0.7}), "token_merge:r=8"], calib[0],
                              calibration=calib).graph
    ex = _replays_like_the_graph(graph, [(torch.randn(b, 3, 32, 32, generator=g),) for b in (3, 3, 3, 1, 1, 3)])
    assert len(ex.replay.plans) == 2                     # batch 3 and batch 1, each from its second call
    plan = ex.replay.plans[next(iter(ex.replay.plans))]
    assert 0 < plan.arena.numel() < 4 * 2 ** 20
    if hasattr(kernels.library(), "go_run_calls"):      # x86-64 Linux: the kernels ran in runs made from C
        assert sum(len(s.calls) for s in plan.steps if isinstance(s, _Calls)) > len(plan.steps)


def test_beit_with_relative_position_bias_replays_bit_identically():
    """BEiT's position-bias index is scattered into an int64 buffer of the arena by torch, which asserts that the
    storage holds whole int64s: the arena ends on a whole 64 bytes (a new-user trial's had 29137 bytes, and the
    second call of that shape failed; the layout's own test has such a buffer)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8, num_labels=3, use_mean_pooling=False,
                                  use_relative_position_bias=True)
    model = transformers.BeitForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(2)]
    graph = graphopt.optimize(model, ["integer_only"], calib[0], calibration=calib).graph
    ex, plain = lower(graph, "cpu_integer", threads=2), lower(graph, "cpu_integer", threads=2, replay=False)
    with torch.no_grad():                    # as OptimizedModel calls it (inference_mode took another path)
        for _ in range(3):
            x = torch.randn(3, 3, 32, 32, generator=g)
            assert torch.equal(_first(ex(x)), _first(plain(x)))
    assert [p.arena.numel() % 64 for p in ex.replay.plans.values()] == [0]


def test_bert_skipping_padding_replays_bit_identically():
    """Masked attention, live rows (zero_padded_positions) and integer embeddings: the masks differ per call."""
    model, g = tiny_bert(64, layers=2), torch.Generator().manual_seed(1)

    def feed(n=4):
        ids, mask = padded_ids(g, n, 12)
        return {"input_ids": ids, "attention_mask": mask}

    calib = [((), feed()) for _ in range(2)]
    float_graph = graphopt.optimize(model, [], calib[0]).graph
    graph = graphopt.optimize(float_graph, [("integer_only", {"smoothquant": 0.7}), "zero_padded_positions"],
                              calib[0], calibration=calib).graph
    ex = _replays_like_the_graph(graph, [feed() for _ in range(4)])
    assert len(ex.replay.plans) == 1


def test_calls_from_two_threads_at_once_stay_identical(tiny_vit_case):
    """One call replays at a time; a call that finds the plan busy runs the fx graph. Both threads' outputs equal
    the torch reference for their own inputs."""
    import threading
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(2)]
    graph = graphopt.optimize(tiny_vit_case.model, [("integer_only", {"smoothquant": 0.7})], calib[0],
                              calibration=calib).graph
    ex, reference = lower(graph, "cpu_integer", threads=2), lower(graph, "torch")
    inputs = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(24)]
    want = [reference.run_flat(x)[0] for x in inputs]
    got = [None] * len(inputs)

    def worker(first):
        with torch.inference_mode():
            for i in range(first, len(inputs), 2):
                got[i] = ex.run_flat(inputs[i])[0]

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(ex.replay.plans) == 1


def test_arena_gives_live_buffers_their_own_bytes():
    """a [0, 2] and b [1, 3] overlap in time, c [3, 4] outlives a: c may take a's bytes, never b's."""
    class Storage:
        def __init__(self, n):
            self.n = n

        def data_ptr(self):
            return id(self)

        def nbytes(self):
            return self.n

    a, b, c = (_Buffer(Storage(n), first) for n, first in ((100, 0), (64, 1), (90, 3)))
    a.last, b.last, c.last = 2, 3, 4
    size = _lay_out([a, b, c])
    assert (a.offset, b.offset, c.offset) == (0, 128, 0)          # b after a, 64-aligned; c in a's place
    assert size == 192
    d = _Buffer(Storage(29), 0)                                   # odd bytes (u8) at the end: the arena still
    d.last = 4                                                    # holds whole int64s (BEiT's select_scatter)
    assert _lay_out([a, b, c, d]) == 256


def test_a_forward_that_reads_values_into_python_runs_as_it_is():
    def run(x):
        return (x * int(x.sum()),)

    replay = Replay(run, [])
    x = torch.arange(6, dtype=torch.int32)
    for _ in range(3):
        assert torch.equal(replay(x)[0], x * 15)
    assert not replay.plans and "reads a tensor's values into Python" in next(iter(replay.refused.values()))


def test_a_kernel_reading_memory_the_plan_does_not_hold_is_not_replayed():
    """The kernel's input is a ctypes array, memory neither torch nor the executable holds for the replay."""
    import ctypes
    from graphopt.backends import cpu_integer_edges as edges
    outside = (ctypes.c_float * 4)(1.0, 2.0, 3.0, 4.0)

    def run(x):
        y = torch.empty(4, dtype=torch.int32)
        edges.library().ge_quantize(ctypes.addressof(outside), 4, 1.0, -10.0, 10.0, 0, 2, y.data_ptr(), 1)
        return (y + x,)

    replay = Replay(run, [])
    x = torch.arange(4, dtype=torch.int32)
    for _ in range(3):
        assert torch.equal(replay(x)[0], x + torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    assert not replay.plans and "reads memory" in next(iter(replay.refused.values()))


@pytest.mark.parametrize("merges", [1, 2])        # one call from Python, or a run of two made from C
def test_a_kernel_status_that_changes_ends_the_replay_with_the_kernels_error(merges):
    """Token merging returns an error status for sizes below 1: captured with valid sizes, replayed with a bad
    one, the call runs on the forward as it is, which raises the kernel's error."""
    g = torch.Generator().manual_seed(2)
    x, keys = torch.randint(-99, 99, (2, 9, 8), generator=g, dtype=torch.int32), torch.randint(-9, 9, (2, 9, 4),
                                                                                                  generator=g).to(torch.int8)
    replay = Replay(lambda x, k, s: [tokens.token_merge(x, k, s, 3, 1, 0, 2) for _ in range(merges)][-1], [])
    sizes = torch.ones(2, 9, 1, dtype=torch.int32)
    first = replay(x, keys, sizes)
    assert torch.equal(replay(x, keys, sizes)[0], first[0]) and replay.plans
    if merges == 2 and hasattr(kernels.library(), "go_run_calls"):
        assert any(isinstance(s, _Calls) for s in replay.plans[next(iter(replay.plans))].steps)
    with pytest.raises(ValueError, match="size is below 1"):
        replay(x, keys, torch.zeros(2, 9, 1, dtype=torch.int32))
    assert not replay.plans and "returned" in next(iter(replay.refused.values()))
