"""The package layout: no import cycle among treespec's modules, imports inside functions counted.

Every treespec/**/*.py is parsed with ast (nothing is imported), each `import` / `from ... import`
anywhere in a module (top level, functions, classes, `if` blocks) becomes an edge to the treespec
module it names, and networkx looks for cycles.

Package __init__ edges: importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so
an import of a module is also an edge to each package above it, except the packages above the
importing module itself (Python initialises those before the importer runs: a submodule that
imports a sibling does not depend on its package's __init__). Naming a package explicitly
(`from treespec import generate`, `from . import x` where x is not a submodule) is an edge to
its __init__, since that reads names the __init__ defines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]


def module_names(package_dir: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py below package_dir (a package's name for its __init__)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _parents(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b']."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `module` imports anywhere in its file, with the package
    __init__ edges described in the module docstring."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    explicit: set[str] = set()  # modules or packages named by the import
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            explicit.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from .. import z
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
            explicit.update(subs)
            if len(subs) < len(node.names):  # some name is an attribute of `source` itself
                explicit.add(source)
    own_packages = set(_parents(module)) | ({module} if is_package else set())
    targets: set[str] = set()
    for name in explicit:
        while name and name not in modules:  # `import treespec.x.y` where y is a name: its module
            name = name.rpartition(".")[0]
        if not name:
            continue  # not treespec
        targets.add(name)
        targets.update(p for p in _parents(name) if p not in own_packages)
    targets.discard(module)
    return targets


def import_graph(package_dir: Path) -> nx.DiGraph:
    modules = module_names(package_dir)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        graph.add_edges_from((module, target) for target in imported_modules(module, path, modules))
    return graph


def cycles(package_dir: Path) -> list[list[str]]:
    """Every simple cycle, each rotated to start at its smallest module name."""
    found = [c[c.index(min(c)) :] + c[: c.index(min(c))] for c in nx.simple_cycles(import_graph(package_dir))]
    return sorted(found)


def test_no_import_cycles_in_treespec():
    found = cycles(ROOT / "treespec")
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(" -> ".join(c + c[:1]) for c in found)


def test_the_graph_sees_every_module_and_the_engine_edges():
    graph = import_graph(ROOT / "treespec")
    assert {"treespec", "treespec.backends.base", "treespec.engine.loop", "treespec.drafting.policy"} <= set(graph)
    assert graph.has_edge("treespec.engine.speculator", "treespec.backends.factory")
    assert graph.has_edge("treespec.engine.speculator", "treespec.backends")  # a package __init__ above the target
    assert not graph.has_edge("treespec.engine.api", "treespec")  # its own package: initialised first


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import g\n\ndef f():\n    return g()\n",
        "pkg/b.py": "def g():\n    from pkg.a import f  # lazy: still a cycle\n    return f\n",
    })
    assert cycles(pkg) == [["pkg.a", "pkg.b"]]


def test_package_init_edges(tmp_path):
    """A submodule importing a sibling does not depend on its own package's __init__; reading
    a name from that __init__ does, and a relative import resolves like an absolute one."""
    files = {
        "pkg/__init__.py": "from pkg.sub.a import f\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/a.py": "from .b import g\n",
        "pkg/sub/b.py": "import pkg.sub.c\n",
        "pkg/sub/c.py": "",
    }
    assert cycles(_write(tmp_path, files)) == []
    files["pkg/sub/c.py"] = "def h():\n    from pkg import f\n"
    assert cycles(_write(tmp_path, files)) == [["pkg", "pkg.sub.a", "pkg.sub.b", "pkg.sub.c"]]


def test_implementations_follow_the_protocols():
    """Every backend, cache, drafter and tree policy has what its protocol states (members by
    name: typing's runtime check), so the engine needs no getattr/hasattr to use them."""
    import torch

    from treespec.backends.base import Backend, TreeCache
    from treespec.backends.cuda_graphs import GraphedBackend
    from treespec.backends.flash import FlashBackend, reference_prefix_attention
    from treespec.backends.sdpa import SdpaBackend
    from treespec.backends.static_cache import StaticSdpaBackend
    from treespec.drafting.ahead import AheadDrafter
    from treespec.drafting.base import Drafter, GreedyProposer
    from treespec.drafting.policy import TreePolicy, resolve_policy
    from treespec.stats import GenerationStats
    from treespec.testing import tiny_model

    model = tiny_model(0)
    flash = FlashBackend(prefix_attention=reference_prefix_attention)
    backends = [SdpaBackend(), StaticSdpaBackend(), flash, GraphedBackend(flash)]
    for backend in backends:
        assert isinstance(backend, Backend), type(backend).__name__
        assert isinstance(backend.make_cache(model, 32), TreeCache), type(backend).__name__
    for tree in ([2, 1], "dynamic", "adaptive"):
        policy = resolve_policy(tree, "tree")
        assert isinstance(policy, TreePolicy), type(policy).__name__
        drafter = policy.make_drafter(model, SdpaBackend(), SdpaBackend().make_cache(model, 64), GreedyProposer(), GenerationStats())
        assert isinstance(drafter, Drafter), type(drafter).__name__
        assert isinstance(drafter, AheadDrafter) == (tree != "adaptive"), type(drafter).__name__  # overlap=
    assert not isinstance(torch.zeros(1), TreeCache)  # the check can fail
