"""Graph utilities: remove_dead, checkpoint / rollback, ancestors / descendants."""
import pytest
import torch

from graphopt.ir import Graph, GraphError, TensorType, verify
from graphopt.ir.ops.onnx_opaque import OP as ONNX_OPAQUE
from graphopt.ir.traversal import ancestors, descendants

F32 = torch.float32
T = TensorType(F32, (2, 4))


def state(g: Graph):
    """Everything an edit can change, by name: the text form, inputs, outputs, constants, uses."""
    uses = {v.name: sorted((n.label(), i) for n, i in v.uses) for v in g.values()}
    return (str(g), [v.name for v in g.inputs], [v.name for v in g.outputs], list(g.constants),
            [n.label() for n in g.nodes], uses)


def chain():
    """x -> relu -> exp -> neg (output); a separate add of a constant."""
    g = Graph()
    x = g.add_input("x", T)
    c = g.add_constant(torch.ones(2, 4), "c")
    r = g.op.relu(x)
    e = g.op.exp(r)
    n = g.op.neg(e)
    a = g.op.add(x, c)
    g.set_outputs([n])
    return g, x, c, r, e, n, a


# ---- remove_dead ---------------------------------------------------------------------------
def test_remove_dead_erases_unused_chains_in_one_sweep_and_their_constants():
    g = Graph()
    x = g.add_input("x", T)
    c = g.add_constant(torch.ones(2, 4), "c")
    kept = g.op.relu(x)
    dead = g.op.neg(g.op.exp(g.op.add(x, c)))   # add -> exp -> neg, nothing reads neg
    g.set_outputs([kept])
    assert dead.uses == []
    assert g.remove_dead() == 3
    assert g.op_counts() == {"relu": 1}
    assert "c" not in g.constants
    verify(g)


def test_remove_dead_keeps_graph_outputs_and_random_ops_unless_asked():
    g = Graph()
    x = g.add_input("x", T)
    out = g.op.relu(x)
    g.create_node(ONNX_OPAQUE, [x], {"domain": "", "op_type": "RandomUniformLike", "out_types": (T,)})
    g.set_outputs([out])
    assert g.remove_dead() == 0
    assert g.op_counts() == {ONNX_OPAQUE: 1, "relu": 1}
    assert g.remove_dead(keep_impure=False) == 1
    assert g.op_counts() == {"relu": 1}


# ---- checkpoint / rollback -----------------------------------------------------------------
def test_rollback_undoes_insertion_erasure_rename_and_rewiring():
    g, x, c, r, e, n, a = chain()
    before = state(g)
    cp = g.checkpoint()
    with g.inserting_before(e.producer):
        s = g.op.sigmoid(r)                       # insertion in the middle
    g.set_input(e.producer, 0, s)                 # rewire
    g.replace_all_uses_with(e, g.op.tanh(r))      # append + rewire every use
    g.set_outputs([g.op.sigmoid(n)])
    g.rename(r, "renamed")
    g.erase_node(a.producer)                      # erasure
    g.add_constant(torch.zeros(3), "new")
    g.remove_unused_constants()                   # drops "c" and "new"
    assert state(g) != before
    cp.rollback()
    assert state(g) == before
    verify(g)
    assert g.has_name(r.name) and not g.has_name("renamed")
    cp.release()


def test_rollback_frees_the_names_it_took():
    g, x, *_ = chain()
    probe = g.clone()
    expected = probe.op.relu(probe.inputs[0]).name
    cp = g.checkpoint()
    g.op.relu(x)
    g.op.relu(x)
    cp.rollback()
    cp.release()
    assert g.op.relu(x).name == expected


def test_created_nodes_and_release_keep_the_edits():
    g, x, *_ = chain()
    cp = g.checkpoint()
    first = g.op.sigmoid(x).producer
    second = g.op.tanh(first.output).producer
    g.erase_node(second)
    assert cp.created_nodes() == [first]
    cp.release()
    assert g.op_counts()["sigmoid"] == 1
    with pytest.raises(GraphError, match="released"):
        cp.rollback()


def test_checkpoint_as_context_rolls_back_on_error_only():
    g, x, *_ = chain()
    before = state(g)
    with pytest.raises(ValueError):
        with g.checkpoint():
            g.op.sigmoid(x)
            raise ValueError("handler failed")
    assert state(g) == before
    with g.checkpoint():
        g.op.sigmoid(x)
    assert g.op_counts()["sigmoid"] == 1


def test_nested_checkpoints_roll_back_only_their_own_edits():
    g, x, *_ = chain()
    outer = g.checkpoint()
    g.op.sigmoid(x)
    middle = state(g)
    inner = g.checkpoint()
    g.op.tanh(x)
    inner.rollback()
    inner.release()
    assert state(g) == middle
    outer.rollback()
    outer.release()
    assert "sigmoid" not in g.op_counts()


def test_rollback_undoes_a_topological_sort():
    g, x, c, r, e, n, a = chain()
    g.move_before(a.producer, r.producer)
    before = state(g)
    cp = g.checkpoint()
    g.move_before(r.producer, None)    # relu after its users: out of order
    g.topological_sort()
    cp.rollback()
    cp.release()
    assert state(g) == before


def test_rename_refuses_a_taken_name():
    g, x, c, r, *_ = chain()
    with pytest.raises(GraphError, match="taken"):
        g.rename(r, "x")
    g.rename(c, "weights")
    assert g.constants["weights"] is c and not g.has_name("c")


# ---- traversal -----------------------------------------------------------------------------
def diamond():
    """x -> a=relu -> b=exp, c=neg(a) -> d=add(b, c) -> e=sigmoid(d)"""
    g = Graph()
    x = g.add_input("x", T)
    a = g.op.relu(x)
    b = g.op.exp(a)
    c = g.op.neg(a)
    d = g.op.add(b, c)
    e = g.op.sigmoid(d)
    g.set_outputs([e])
    return g, x, a, b, c, d, e


def ops(nodes):
    return [n.op for n in nodes]


def test_ancestors_are_breadth_first_nearest_first_and_unique():
    g, x, a, b, c, d, e = diamond()
    assert ops(ancestors(e)) == ["sigmoid", "add", "exp", "neg", "relu"]
    assert ops(ancestors(e.producer)) == ["add", "exp", "neg", "relu"]  # a node: from its inputs
    assert ops(ancestors([b, c])) == ["exp", "neg", "relu"]
    assert list(ancestors(x)) == []


def test_ancestors_through_filter_yields_the_stopping_node_but_not_beyond():
    g, x, a, b, c, d, e = diamond()
    assert ops(ancestors(e, through=lambda n: n.op != "add")) == ["sigmoid", "add"]
    assert ops(ancestors(d, through=lambda n: n.op != "exp")) == ["add", "exp", "neg", "relu"]  # relu via neg


def test_limit_bounds_the_nodes_visited():
    g, x, a, b, c, d, e = diamond()
    assert ops(ancestors(e, limit=2)) == ["sigmoid", "add"]
    assert ops(descendants(x, limit=3)) == ["relu", "exp", "neg"]


def test_depth_bounds_the_steps_from_the_start():
    g, x, a, b, c, d, e = diamond()
    assert ops(ancestors(e, depth=2)) == ["sigmoid", "add"]
    assert ops(ancestors(e.producer, depth=2)) == ["add", "exp", "neg"]  # a node's producers are one step
    assert ops(descendants(x, depth=3)) == ["relu", "exp", "neg", "add"]


def test_descendants_mirror_ancestors():
    g, x, a, b, c, d, e = diamond()
    assert ops(descendants(x)) == ["relu", "exp", "neg", "add", "sigmoid"]
    assert ops(descendants(a.producer)) == ["exp", "neg", "add", "sigmoid"]
    assert ops(descendants(a, through=lambda n: n.op != "exp")) == ["exp", "neg", "add", "sigmoid"]
    assert ops(descendants(a, through=lambda n: False)) == ["exp", "neg"]
