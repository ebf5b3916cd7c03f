import networkx as nx
import pytest
import torch

from treespec.tree.topology import PRESETS, TreeShapeError, TreeTopology, resolve_tree


def test_widths_topology_tensors():
    t = TreeTopology.from_widths([2, 2])
    assert t.parents == (-1, 0, 0, 1, 1, 2, 2)
    assert t.ranks == (0, 0, 1, 0, 1, 0, 1)
    assert t.depth.tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert t.level_starts == (0, 1, 3, 7)
    assert t.paths[5].tolist() == [0, 2, 5]
    assert t.paths[1].tolist() == [0, 1, -1]
    assert t.children[0].tolist() == [1, 2]
    assert t.children[3].tolist() == [-1, -1]
    # ancestor-or-self mask
    assert t.ancestors[6].nonzero().flatten().tolist() == [0, 2, 6]
    assert t.ancestors[1].nonzero().flatten().tolist() == [0, 1]
    par, rank = t.level_children(1)
    assert par.tolist() == [0, 0, 1, 1] and rank.tolist() == [0, 1, 0, 1]


def test_node_counts_of_presets():
    assert TreeTopology.from_widths([4, 2, 2, 1]).num_drafts == 4 + 8 + 16 + 16
    for name, widths in PRESETS.items():
        assert TreeTopology.from_widths(widths).max_depth == len(widths), name


def test_networkx_round_trip():
    t = TreeTopology.from_widths([3, 1, 2])
    g = t.to_networkx()
    assert nx.is_arborescence(g)
    assert TreeTopology.from_networkx(g) == t


def test_irregular_tree_from_parents():
    # root -> a, b; a -> c, d; b -> e; c -> f
    t = TreeTopology.from_parents([-1, 0, 0, 1, 1, 2, 3])
    assert t.max_depth == 3
    assert t.ranks == (0, 0, 1, 0, 1, 0, 0)
    assert t.level_width(1) == 2 and t.level_width(2) == 1


@pytest.mark.parametrize(
    "widths", [[], [0], [2, -1], [1.5], ["2"], [True], [64, 64, 64]]
)
def test_malformed_widths_are_rejected(widths):
    with pytest.raises(TreeShapeError):
        resolve_tree(widths, "tree")


@pytest.mark.parametrize(
    "parents,ranks",
    [
        ((0,), (0,)),  # no root
        ((-1, 0, 5), (0, 0, 0)),  # parent after child
        ((-1, 0, 1, 0), (0, 0, 0, 1)),  # not level by level
        ((-1, 0, 0), (0, 0, 0)),  # two siblings with one rank
        ((-1, 0, 0), (0, 0, 2)),  # rank gap
    ],
)
def test_malformed_parents_are_rejected(parents, ranks):
    with pytest.raises(TreeShapeError):
        TreeTopology(parents, ranks)


def test_not_a_tree_graph_is_rejected():
    g = nx.DiGraph([(0, 1), (0, 2), (1, 3), (2, 3)])
    with pytest.raises(TreeShapeError, match="rooted tree"):
        TreeTopology.from_networkx(g)


def test_resolve_tree_rules():
    assert resolve_tree(None, "autoregressive").num_drafts == 0
    assert resolve_tree("chain-3", "linear").max_depth == 3
    with pytest.raises(TreeShapeError, match="chain"):
        resolve_tree([2, 1], "linear")
    with pytest.raises(TreeShapeError, match="unknown tree preset"):
        resolve_tree("nope", "tree")


def test_tensors_made_under_fake_tensor_mode_are_not_kept():
    """A topology's tensors are kept per device for later generations; ones made while a tracer's
    FakeTensorMode is active must not be, or every later generation would read fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    topo = TreeTopology.from_widths([3, 1, 2, 1])  # a shape no other test of this process has made
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = topo.tensors("cpu")
    assert type(fake.parents) is not torch.Tensor
    real = topo.tensors("cpu")
    assert type(real.parents) is torch.Tensor and real is topo.tensors("cpu")
