"""Tree tools for the command line: the optimal static tree of a measured acceptance profile
(treespec.tree.sequoia), written as a preset file and optionally drawn.

    python -m treespec.bench.tree_tools --profile treespec/configs/presets/optimized_code.yaml --budget 32 \
        --max-depth 6 --out outputs/code-32.yaml [--png outputs/code-32.png]

--profile takes a preset file (YAML or JSON, its `profile` entry: the files under treespec/configs/presets/
and those this tool writes) or a profile JSON ({"probs": [[...], ...]}).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import networkx as nx

from treespec.tree.presets import write_preset
from treespec.tree.profile import AcceptanceProfile, acceptance_reach, expected_accepted_length, expected_tau
from treespec.tree.sequoia import optimize_tree
from treespec.tree.topology import TreeTopology

__all__ = ["draw_tree", "main"]


def draw_tree(
    topo: TreeTopology,
    path_png: str | Path,
    profile: AcceptanceProfile | None = None,
    title: str | None = None,
) -> None:
    """Draw the tree level by level (root on top) to a PNG; with a profile, colour each node by
    the probability that it is accepted. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = topo.to_networkx()
    # layered layout: y = -depth; leaves take consecutive x in depth-first rank order and each
    # parent sits centred over its children, so siblings read best (rank 0) to worst, left to right
    kids = [[c for c in row if c >= 0] for row in topo.children.tolist()]
    x: dict[int, float] = {}
    next_leaf = 0.0
    stack = [(0, False)]
    while stack:
        node, done = stack.pop()
        if not kids[node]:
            x[node], next_leaf = next_leaf, next_leaf + 1.0
        elif done:
            x[node] = (x[kids[node][0]] + x[kids[node][-1]]) / 2
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(kids[node]))
    depth = topo.depth.tolist()
    pos = {i: (x[i], -float(depth[i])) for i in range(topo.num_nodes)}
    colors = acceptance_reach(topo, profile) if profile is not None else None
    n_leaves = sum(1 for k in kids if not k)
    fig, ax = plt.subplots(figsize=(min(40.0, max(5.0, 0.3 * n_leaves + 2.0)), 1.5 + 0.9 * topo.max_depth))
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=False, edge_color="#888888")
    nodes = nx.draw_networkx_nodes(
        g, pos, ax=ax, node_size=120, node_color=colors if colors is not None else "#4c72b0",
        cmap="viridis", vmin=0.0, vmax=1.0,
    )
    nx.draw_networkx_labels(g, pos, labels={i: str(topo.ranks[i]) if i else "" for i in g}, font_size=6, font_color="white", ax=ax)
    if colors is not None:
        fig.colorbar(nodes, ax=ax, label="P(node accepted)")
    head = title or topo.describe()
    if profile is not None:
        head += f"\nexpected tau {expected_tau(topo, profile):.3f}"
    ax.set_title(head, fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path_png, dpi=150)
    plt.close(fig)



def load_profile(path: str | Path) -> AcceptanceProfile:
    """The acceptance profile in a preset file (its `profile` entry) or a profile file (`probs`),
    YAML or JSON (JSON is YAML too)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is neither YAML nor JSON: {err}") from None
    if not isinstance(data, dict) or ("profile" not in data and "probs" not in data):
        raise ValueError(f"{path} has no 'profile' (a preset file) or 'probs' (a profile file) entry")
    return AcceptanceProfile(data["profile"] if "profile" in data else data["probs"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m treespec.bench.tree_tools",
        description="Optimal static draft tree for a measured acceptance profile (Sequoia-style DP).",
    )
    ap.add_argument("--profile", required=True,
                    help="a preset file (configs/presets/*.yaml: its 'profile') or a profile JSON ({'probs': [[...], ...]})")
    ap.add_argument("--budget", type=int, required=True, help="max draft nodes (root excluded)")
    ap.add_argument("--max-depth", type=int, required=True, help="max tree depth")
    ap.add_argument("--out", help="preset file to write (.yaml, or .json)")
    ap.add_argument("--name", help="preset name (default: the output file's stem)")
    ap.add_argument("--png", help="also draw the tree to this PNG")
    args = ap.parse_args(argv)
    try:
        profile = load_profile(args.profile)
        topo = optimize_tree(profile, args.budget, args.max_depth)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    e = expected_accepted_length(topo, profile)
    print(f"{topo.describe()}; level widths {[topo.level_width(d) for d in range(topo.max_depth)]}")
    print(f"expected accepted length {e:.4f}, expected tau {1 + e:.4f}")
    print(f"parents {list(topo.parents)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_preset(topo, args.out, profile, name=args.name, budget=args.budget)
        print(f"wrote {args.out}")
    if args.png:
        draw_tree(topo, args.png, profile)
        print(f"drew {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
