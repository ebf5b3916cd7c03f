"""`treespec-report`: aggregate many `treespec-bench` runs into a table and plots.

    treespec-report outputs/bench-multirun/2026-11-22/10-00-00 [more dirs or results.json ...] \
        --out reports/cpu [--no-plots]

Reads every results.json below the given paths (one per cell) and writes into --out:

    table.md, table.csv     one row per cell, numbers exactly as the runs recorded them
    tau_tokens_per_second.png  tau and tokens/s per method and domain
    speedup.png             speedup against the target alone, per method and domain
    acceptance_histogram.png   accepted draft tokens per step, per domain and method
    speedup_vs_tree_size.png   speedup (and tau) against draft tokens per step

`speedup (median/prompt)` is the median over prompts of the same ratio taken prompt by prompt
(robust to a busy period of a shared machine that hit one prompt).

Speedup (Spec-Bench): tokens/s of the cell / tokens/s of the target alone (method=autoregressive)
on the same prompts: the autoregressive cell with the same model, dataset, prompts (offset and
count), max_new_tokens and ignore_eos, preferring one with the same temperature, then one from
the same sweep directory, then the most recent. The table names the baseline it used.

For greedy cells, `same_as_target` counts the prompts whose generated tokens equal the target
alone's (lossless greedy decoding must give n/n; hf_assisted can differ through numerics).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from treespec.bench.metrics import PromptRecord, speedup

log = logging.getLogger(__name__)

COLUMNS = [
    ("model", "model"),
    ("domain", "domain"),
    ("dataset", "dataset"),
    ("method", "method"),
    ("tree", "tree"),
    ("draft_nodes", "draft tokens/step"),
    ("temperature", "T"),
    ("prompts", "prompts"),
    ("new_tokens", "new tokens"),
    ("tau", "tau"),
    ("acceptance_rate", "accept rate"),
    ("tokens_per_second", "tokens/s"),
    ("speedup", "speedup"),
    ("speedup_median", "speedup (median/prompt)"),
    ("draft_time_share", "draft time"),
    ("same_as_target", "same as target"),
    ("mean_loadavg", "load avg"),
    ("status", "status"),
    ("run", "run"),
]


@dataclass
class Cell:
    """One results.json."""

    path: Path
    cell: dict
    aggregate: dict
    prompts: list[dict]
    date: str = ""
    baseline: "Cell | None" = None
    extra: dict = field(default_factory=dict)
    status: dict = field(default_factory=lambda: {"complete": True})
    config: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.status.get("complete"))

    @property
    def status_text(self) -> str:
        """'complete', or 'INCOMPLETE: 3/10 prompts (stopped by KeyboardInterrupt)'."""
        if self.complete:
            return "complete"
        st = self.status
        done, total = st.get("prompts_done", len(self.prompts)), st.get("prompts_total", "?")
        why = f" (stopped by {st['stopped_by'].split(':')[0]})" if st.get("stopped_by") else ""
        return f"INCOMPLETE: {done}/{total} prompts{why}"

    @property
    def auto_choice(self) -> str | None:
        """With tree='auto', the shape it chose ('the target alone', 'chain-4', ...; 'mixed' when
        prompts differ); None otherwise."""
        names = {p["tree_choice"]["chosen"]["name"] for p in self.prompts if p.get("tree_choice")}
        return None if not names else names.pop() if len(names) == 1 else "mixed: " + ", ".join(sorted(names))

    @property
    def target_alone(self) -> bool:
        """Nothing was drafted: the target alone ran (method=autoregressive, or tree='auto' chose it)."""
        return self.cell["method"] == "autoregressive" or self.auto_choice == "the target alone"

    @property
    def dataset(self) -> str:
        """The prompts' set, as the run produced them ('synthetic prompts' for random token ids)."""
        synthetic = self.cell["dataset"] == "synthetic" or self.config.get("dataset", {}).get("name") == "synthetic"
        return "synthetic prompts" if synthetic else self.cell["dataset"]

    @property
    def label(self) -> str:
        """Method, with its tree (or k) and temperature: the series name in the plots."""
        c = self.cell
        m = c["method"]
        if m == "tree" and self.auto_choice:
            m = "target alone (tree=auto)" if self.target_alone else f"tree auto: {_short(self.auto_choice, 28)}"
        elif m == "tree":
            m += _tree_str(c["tree"])
        elif m in ("linear", "hf_assisted"):
            m += f" k={c['linear_k']}"
        if c["temperature"]:
            m += f" T={c['temperature']:g}"
        return m

    @property
    def baseline_key(self) -> tuple:
        c = self.cell
        # synthetic prompts are seeded by the set they replace: humaneval's are not mtbench's
        return (c["model"], c["dataset"], c.get("dataset_replaced"), c["num_prompts"], c["offset"], c["max_new_tokens"],
                c["ignore_eos"])  # fmt: skip


def _tree_str(tree) -> str:
    """[4,1,1] for a widths list; a tree policy's own label (dynamic, adaptive, optimized) as is."""
    if isinstance(tree, (list, tuple)):
        return "[" + ",".join(map(str, tree)) + "]"
    return str(tree)


def find_results(paths: list[Path], name: str = "results.json") -> list[Path]:
    found: list[Path] = []
    for p in paths:
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob(name)))
        else:
            raise SystemExit(f"{p} does not exist: give treespec-bench run or sweep directories (or results.json files)")
    return sorted(set(found))


def load_cells(paths: list[Path]) -> list[Cell]:
    cells = []
    for f in find_results(paths):
        try:
            d = json.loads(f.read_text())
            cells.append(Cell(f, d["cell"], d["aggregate"], d.get("prompts", []), d.get("environment", {}).get("date", ""),
                              status=d.get("status", {"complete": True}), config=d.get("config", {})))  # fmt: skip
        except (OSError, ValueError, KeyError) as err:
            log.warning("skipping %s: not a treespec-bench results file (%r)", f, err)
    return cells


def attach_baselines(cells: list[Cell]) -> None:
    """Give every cell its autoregressive baseline (see the module docstring)."""
    ar = defaultdict(list)
    for c in cells:
        if c.cell["method"] == "autoregressive":
            ar[c.baseline_key].append(c)
    for c in cells:
        candidates = ar.get(c.baseline_key, [])
        if not candidates:
            continue
        if c.cell["method"] == "autoregressive" and c in candidates:
            c.baseline = c
            continue

        def rank(b: Cell, c=c):
            return (
                b.cell["temperature"] == c.cell["temperature"],
                b.path.parent.parent == c.path.parent.parent,
                b.date,
            )

        c.baseline = max(candidates, key=rank)


def _median_speedup(c: Cell) -> float | None:
    """Median over prompts of (this prompt's tokens/s) / (the baseline's on the same prompt):
    robust to a busy period that hit one prompt of one method."""
    b = c.baseline
    if b is None:
        return None
    ref = {p["id"]: PromptRecord.from_dict(p).tokens_per_second for p in b.prompts}
    ratios = []
    for p in c.prompts:
        tps, base = PromptRecord.from_dict(p).tokens_per_second, ref.get(p["id"])
        if tps and base:
            ratios.append(tps / base)
    if not ratios:
        return None
    ratios.sort()
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def _chosen_nodes(c: Cell) -> int | None:
    """Draft nodes of the tree tree='auto' chose (the first prompt's choice)."""
    return next((p["tree_choice"]["chosen"]["draft_nodes"] for p in c.prompts if p.get("tree_choice")), None)


def _same_as_target(c: Cell) -> str:
    b = c.baseline
    if b is None or c.cell["temperature"] or b.cell["temperature"]:
        return ""
    ref = {p["id"]: p.get("output_ids") for p in b.prompts}
    same = total = 0
    for p in c.prompts:
        r, o = ref.get(p["id"]), p.get("output_ids")
        if r is None or o is None:
            continue
        total += 1
        n = min(len(r), len(o))
        same += r[:n] == o[:n]
    return f"{same}/{total}" if total else ""


def rows(cells: list[Cell], root: Path | None = None) -> list[dict]:
    """One row per cell, in a stable order (model, domain: code, text, structured, then others;
    dataset, temperature, method, tree)."""
    attach_baselines(cells)
    order = {"autoregressive": 0, "linear": 1, "tree": 2, "hf_assisted": 3}
    domains = {"code": 0, "text": 1, "structured": 2}
    out = []
    for c in sorted(
        cells,
        key=lambda c: (c.cell["model"], domains.get(c.cell["domain"], 9), c.cell["domain"], c.cell["dataset"], c.cell["temperature"],
                       order.get(c.cell["method"], 9), c.cell["draft_nodes"], str(c.cell["tree"]), str(c.path)),
    ):  # fmt: skip
        a = c.aggregate
        measured = c.baseline is not None and a["prompts"] and c.baseline.aggregate["prompts"]  # a stopped run may have none
        sp = speedup(a["tokens_per_second"], c.baseline.aggregate["tokens_per_second"]) if measured else None
        run = c.path.parent
        if root is not None:
            try:
                run = run.relative_to(root)
            except ValueError:
                pass
        tree = c.cell["tree"]
        choice = c.auto_choice
        out.append(
            {
                "model": c.cell["model"],
                "domain": c.cell["domain"],
                "dataset": c.dataset,
                "method": c.cell["method"],
                "label": c.label,
                "tree": f"auto chose {choice}" if choice else _tree_str(tree) if tree is not None
                else (f"k={c.cell['linear_k']}" if c.cell.get("linear_k") else ""),
                "linear_k": c.cell.get("linear_k"),
                "draft_nodes": 0 if c.target_alone else _chosen_nodes(c) or c.cell["draft_nodes"],
                "target_alone": c.target_alone,
                "complete": c.complete,
                "status": c.status_text,
                "temperature": c.cell["temperature"],
                "prompts": a["prompts"],
                "new_tokens": a["new_tokens"],
                "target_forwards": a["target_forwards"],
                "tau": a["tau"],
                "acceptance_rate": a["acceptance_rate"],
                "tokens_per_second": a["tokens_per_second"],
                "time_total": a["time_total"],
                "speedup": sp,
                "speedup_median": _median_speedup(c),
                "baseline_tokens_per_second": c.baseline.aggregate["tokens_per_second"] if c.baseline else None,
                "draft_time_share": a["time_draft"] / a["time_total"] if a["time_total"] and a.get("time_draft") else None,
                "same_as_target": _same_as_target(c),
                "mean_loadavg": a.get("mean_loadavg"),
                "accepted_length_histogram": a.get("accepted_length_histogram", {}),
                "run": str(run),
            }
        )
    return out


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("tau", "speedup", "speedup_median"):
        return f"{v:.2f}"
    if key == "tokens_per_second":
        return f"{v:.2f}"
    if key in ("acceptance_rate", "draft_time_share"):
        return f"{100 * v:.0f}%"
    if key == "mean_loadavg":
        return f"{v:.1f}"
    if key == "temperature":
        return f"{v:g}"
    return str(v)


def to_markdown(table: list[dict], columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in table:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict]) -> str:
    keys = [k for k in table[0] if k != "accepted_length_histogram"] if table else []
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({k: r[k] for k in keys})
    return buf.getvalue()


# ------------------------------------------------------------------------------------ plots
def pyplot():
    """matplotlib.pyplot on the Agg backend. matplotlib is an extra (treespec[plot]): the library
    and the tables do without it."""
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit("the plots need matplotlib: pip install 'treespec[plot]' (or pass --no-plots: "
                         "the tables are written without it)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(r: dict, unique: bool) -> str:
    """A row's series name: its method (and temperature) when every domain has one cell of each
    method, so that e.g. linear k=7 (code) and linear k=3 (text) share a colour; else its full
    label (sweeps). Says when tree='auto' ran the target alone, and when the run is incomplete."""
    name = r["label"] if not unique or r["target_alone"] and r["method"] == "tree" else (
        r["method"] + (f" T={r['temperature']:g}" if r["temperature"] else ""))
    return name + ("" if r["complete"] else " [incomplete]")


def _title(table: list[dict]) -> str:
    """What every plot is about: the model, the prompts' sets, incomplete runs."""
    sets = ", ".join(dict.fromkeys(r["dataset"] for r in table))
    partial = sum(not r["complete"] for r in table)
    return f"{table[0]['model']}; prompts: {sets}" + (f"; {partial} run(s) INCOMPLETE" if partial else "")


def plot_all(table: list[dict], out: Path) -> list[Path]:
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    written = []
    if not table:
        return written
    domains = list(dict.fromkeys(r["domain"] for r in table))
    keys = [(r["domain"], r["method"], r["temperature"]) for r in table]
    unique = len(set(keys)) == len(keys)
    series = {id(r): _series(r, unique) for r in table}
    labels = list(dict.fromkeys(series[id(r)] for r in table))
    by = {(r["domain"], series[id(r)]): r for r in table}  # last one wins if a cell is repeated
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    suptitle = _title(table)

    def columns(width_in: float, names: list[str]) -> int:
        """Legend columns that fit the figure's width (about 13 characters an inch at size 8)."""
        chars = max((len(n) for n in names), default=1) + 6
        return max(1, min(len(names), int(width_in * 13 / chars)))


    def bars(ax, key, title, hline=None):
        width = 0.8 / max(len(labels), 1)
        for j, lab in enumerate(labels):
            xs, ys = [], []
            for i, d in enumerate(domains):
                r = by.get((d, lab))
                if r is not None and r.get(key) is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=lab, color=colors[lab], hatch="//" if "[incomplete]" in lab else None)
            if len(labels) * len(domains) <= 24:  # value labels only while they fit above their bars
                for x, y in zip(xs, ys):
                    ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.12)
        if hline is not None:
            ax.axhline(hline, color="k", lw=0.8, ls="--")

    def finish(fig, rows_of_legend: int, path: str):
        fig.suptitle(suptitle, fontsize=10)
        fig.tight_layout(rect=(0, 0.06 * rows_of_legend + 0.02, 1, 0.95))
        written.append(_save(fig, out / path))

    width = max(9.0, 1.2 * len(domains) * max(len(labels), 2) / 2 + 3)
    ncol = columns(width, labels)
    legend_rows = -(-len(labels) // ncol)
    fig, axes = plt.subplots(1, 2, figsize=(width, 4.6 + 0.3 * legend_rows))
    bars(axes[0], "tau", "tau (tokens per target forward)", hline=1.0)
    bars(axes[1], "tokens_per_second", "tokens / s")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    finish(fig, legend_rows, "tau_tokens_per_second.png")

    width1 = max(7.5, width * 0.6)
    ncol1 = columns(width1, labels)
    fig, ax = plt.subplots(figsize=(width1, 4.6 + 0.3 * -(-len(labels) // ncol1)))
    bars(ax, "speedup", "speedup vs the target alone (tokens/s ratio)", hline=1.0)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=ncol1, fontsize=8, frameon=False)
    finish(fig, -(-len(labels) // ncol1), "speedup.png")

    width2 = max(4.8 * len(domains), 6.5)
    fig, axes = plt.subplots(1, len(domains), figsize=(width2, 4.2 + 0.3 * legend_rows), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for lab in labels:
            r = by.get((d, lab))
            if r is None or r["target_alone"] or not r["accepted_length_histogram"]:
                continue
            h = {int(k): v for k, v in r["accepted_length_histogram"].items()}
            total = sum(h.values())
            xs = list(range(max(h) + 1))
            ax.plot(xs, [h.get(x, 0) / total for x in xs], marker="o", label=lab, color=colors[lab])
        ax.set_title(f"{d}: accepted drafts per step", fontsize=10)
        ax.set_xlabel("accepted draft tokens")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("fraction of steps")
    handles = [Line2D([], [], marker="o", color=colors[lab], label=lab) for lab in labels
               if any(by.get((d, lab)) and not by[(d, lab)]["target_alone"] for d in domains)]  # fmt: skip
    ncol2 = columns(width2, [h.get_label() for h in handles])
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=ncol2, fontsize=8, frameon=False)
    finish(fig, -(-max(len(handles), 1) // ncol2), "acceptance_histogram.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.0))
    markers = {"tree": "o", "linear": "s", "hf_assisted": "^"}
    dcolors = {d: plt.get_cmap("tab10")(i) for i, d in enumerate(domains)}
    for r in table:
        if r["target_alone"]:
            continue
        for ax, key in zip(axes, ("speedup", "tau")):
            if r.get(key) is None:
                continue
            filled = r["temperature"] == 0
            ax.scatter(
                r["draft_nodes"], r[key], marker=markers.get(r["method"], "D"), s=40,
                facecolors=dcolors[r["domain"]] if filled else "none", edgecolors=dcolors[r["domain"]],
            )  # fmt: skip
    for ax, key in zip(axes, ("speedup", "tau")):  # a chain's size is its k, the x value: only trees are named
        _annotate(ax, [(r["draft_nodes"], r[key], _short(r["tree"])) for r in table
                       if r["method"] == "tree" and not r["target_alone"] and r.get(key) is not None])  # fmt: skip
    handles = [Line2D([], [], ls="", marker="o", color=c, label=d) for d, c in dcolors.items()]
    handles += [Line2D([], [], ls="", marker=m, color="gray", label=k) for k, m in markers.items()]
    handles += [Line2D([], [], ls="", marker="o", markerfacecolor="none", color="gray", label="T > 0 (hollow)")]
    axes[0].set_title("speedup vs draft tokens per step", fontsize=10)
    axes[1].set_title("tau vs draft tokens per step", fontsize=10)
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("draft tokens per step (tree size; k for chains)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.margins(x=0.15, y=0.12)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    finish(fig, -(-len(handles) // 7), "speedup_vs_tree_size.png")
    plt.close("all")
    return written


def _short(tree: str, width: int = 16) -> str:
    """A point's name that fits beside it ('auto chose tree of 27 drafts, ...' -> 'auto: tree of 27 …')."""
    tree = tree.replace("auto chose ", "auto: ")
    return tree if len(tree) <= width else tree[: width - 1] + "\u2026"


def _annotate(ax, points: list[tuple[float, float, str]]) -> None:
    """Name each point once: points that would print on top of each other share one label
    ('[4,1,1] / [2,1,1]'); labels never take layout room from the axes."""
    if not points:
        return
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()  # what the axes show, all their points included
    dx, dy = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    groups: list[list] = []  # [x, y, texts]: the first point of a cluster carries its label
    for x, y, text in points:
        g = next((g for g in groups if abs(g[0] - x) < 0.06 * dx and abs(g[1] - y) < 0.06 * dy), None)
        if g is None:
            groups.append(g := [x, y, []])
        if text not in g[2]:
            g[2].append(text)
    for x, y, texts in groups:
        # above the point; towards the inside near the axes' ends, so that no label leaves the figure
        ha = "right" if x > x0 + 0.8 * dx else "left" if x < x0 + 0.2 * dx else "center"
        ann = ax.annotate(" / ".join(texts), (x, y), fontsize=6, xytext=(0, 6), textcoords="offset points", ha=ha)
        ann.set_in_layout(False)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------ CLI
def build_report(paths: list[Path], out: Path, *, plots: bool = True) -> list[dict]:
    cells = load_cells(paths)
    if not cells:
        raise SystemExit(f"no results.json found under {', '.join(map(str, paths))}")
    root = paths[0] if len(paths) == 1 and paths[0].is_dir() else None
    table = rows(cells, root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(to_markdown(table))
    (out / "table.csv").write_text(to_csv(table))
    (out / "table.json").write_text(json.dumps(table, indent=1))
    if plots:
        plot_all(table, out)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="treespec-report", description="Aggregate treespec-bench runs into a table and plots.")
    ap.add_argument("paths", nargs="+", type=Path, help="run/sweep directories or results.json files")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <first path>/report)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or ((args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent) / "report")
    table = build_report(args.paths, out, plots=not args.no_plots)
    sys.stdout.write(to_markdown(table))
    partial = [r for r in table if not r["complete"]]
    if partial:
        print(f"\nWARNING: {len(partial)} of {len(table)} runs are INCOMPLETE (stopped before every prompt ran; "
              "their numbers cover the prompts measured):")  # fmt: skip
        for r in partial:
            print(f"  {r['run']}: {r['method']} ({r['label']}): {r['status']}")
    print(f"\n{len(table)} cells -> {out}/table.md, table.csv" + ("" if args.no_plots else ", *.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
