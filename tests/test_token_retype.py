"""retype: after the token count changes, shape attributes follow the token axis by position,
never by value. Hand-built graphs where other sizes equal the token count (16)."""
import pytest
import torch

from graphopt.backends.torch_backend import run
from graphopt.ir import Graph, TensorType
from graphopt.passes.token_common import TokenPassError, retype

F32 = torch.float32


def shrink_input(graph, n):
    """Give the graph input a token count of ``n`` (axis 1) and re-derive every type."""
    x = graph.inputs[0]
    old = x.type
    x.type = TensorType(old.dtype, (old.shape[0], n) + tuple(old.shape[2:]))
    return retype(graph, {id(x): old})


def test_reshape_keeps_a_head_size_equal_to_the_token_count():
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 16, 32)))
    heads = g.op.reshape(x, shape=(x.type.shape[0], 16, 2, 16))           # [B, N, heads, 16]
    flat = g.op.reshape(heads, shape=(x.type.shape[0] * 16, 32))           # [B*N, C]
    grid = g.op.reshape(x, shape=(x.type.shape[0], 16, 32, 1))
    tail = g.op.slice(heads, dim=3, start=0, end=16)                       # the head axis: stays 16
    g.set_outputs([heads, flat, grid, tail])
    shrink_input(g, 13)
    assert [tuple(str(d) for d in v.type.shape) for v in g.outputs] == [
        ("batch", "13", "2", "16"), ("13*batch", "32"), ("batch", "13", "32", "1"), ("batch", "13", "2", "16")]
    xv = torch.randn(2, 13, 32)
    out = run(g, xv)
    torch.testing.assert_close(out[0], xv.reshape(2, 13, 2, 16))
    torch.testing.assert_close(out[1], xv.reshape(26, 32))


def test_slice_to_the_end_of_the_token_axis_follows_it():
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 16, 16)))
    patches = g.op.slice(x, dim=1, start=1, end=16)        # every token after CLS
    first = g.op.slice(x, dim=1, start=0, end=4)           # the first 4 tokens: a literal, stays
    hidden = g.op.slice(x, dim=2, start=0, end=16)         # the hidden axis: stays 16
    g.set_outputs([patches, first, hidden])
    shrink_input(g, 9)
    assert [v.type.shape[1:] for v in g.outputs] == [(8, 16), (4, 16), (9, 16)]


def test_a_split_token_axis_is_refused_not_guessed():
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 16, 8)))
    g.set_outputs([g.op.reshape(x, shape=(x.type.shape[0], 4, 4, 8))])   # tokens -> a 4x4 grid
    with pytest.raises(TokenPassError, match=r"reshape .* splits the token axis into 2 axes"):
        shrink_input(g, 12)
