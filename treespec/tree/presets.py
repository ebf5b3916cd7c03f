"""Tree preset files: a static draft tree (e.g. one treespec.tree.sequoia found) written as YAML or
JSON, with a summary of its shape and, when known, the profile it was optimized for.

YAML goes through OmegaConf (Hydra's config library, a dependency already), so a preset is read
the same way by `load_preset` and by a Hydra config that includes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from treespec.tree.profile import AcceptanceProfile, expected_accepted_length
from treespec.tree.topology import TreeTopology

__all__ = ["PRESET_FORMAT", "load_preset", "preset_dict", "write_preset"]

PRESET_FORMAT = "treespec.tree_preset/v1"
_YAML_HEADER = (
    "# Static draft tree found by treespec.tree.sequoia (positional-acceptance DP, as in Sequoia).\n"
    "# parents/ranks: breadth-first, node 0 = root; level_widths: top-k drafted below each depth.\n"
)


def _level_sizes(topo: TreeTopology) -> list[int]:
    return [topo.level_starts[d + 1] - topo.level_starts[d] for d in range(1, topo.max_depth + 1)]


def preset_dict(
    topo: TreeTopology,
    profile: AcceptanceProfile | None = None,
    *,
    name: str | None = None,
    budget: int | None = None,
) -> dict:
    """The preset as plain data: parents/ranks (breadth-first), a widths summary and, with a
    profile, the expected accepted length and tau."""
    out: dict = {"format": PRESET_FORMAT}
    if name:
        out["name"] = name
    out.update(
        num_drafts=topo.num_drafts,
        max_depth=topo.max_depth,
        level_sizes=_level_sizes(topo),  # nodes at depth 1..D
        level_widths=[topo.level_width(d) for d in range(topo.max_depth)],  # top-k drafted below depth 0..D-1
        parents=list(topo.parents),
        ranks=list(topo.ranks),
    )
    if budget is not None:
        out["budget"] = int(budget)
    if profile is not None:
        e = expected_accepted_length(topo, profile)
        out["expected_accepted_length"] = round(e, 6)
        out["expected_tau"] = round(1.0 + e, 6)
        out["profile"] = [list(r) for r in profile.probs]
    return out


def write_preset(
    topo: TreeTopology,
    path: str | Path,
    profile: AcceptanceProfile | None = None,
    *,
    name: str | None = None,
    budget: int | None = None,
) -> dict:
    """Write the tree as a preset file: JSON when `path` ends in .json, YAML otherwise (loadable
    by Hydra/OmegaConf and by `load_preset`). Returns the written data."""
    path = Path(path)
    data = preset_dict(topo, profile, name=name or path.stem, budget=budget)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=1) + "\n")
    else:
        path.write_text(_YAML_HEADER + OmegaConf.to_yaml(OmegaConf.create(data)))
    return data


def load_preset(path_or_data: str | Path | Mapping) -> TreeTopology:
    """The TreeTopology of a preset written by `write_preset` (a path or the loaded mapping,
    e.g. a Hydra/OmegaConf node converted to a dict)."""
    if isinstance(path_or_data, Mapping):
        data = path_or_data
    else:
        path = Path(path_or_data)
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            data = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(data, Mapping) or "parents" not in data:
        raise ValueError("a tree preset needs a 'parents' list (breadth-first, parents[0] = -1)")
    topo = TreeTopology.from_parents([int(p) for p in data["parents"]])
    if "ranks" in data and [int(r) for r in data["ranks"]] != list(topo.ranks):
        raise ValueError("the preset's ranks do not follow its parents' sibling order")
    return topo
