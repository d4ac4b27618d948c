"""The muP transfer plot: loss against log2(learning rate), a curve per width, muP and SP side by side.

    python scripts/plot_mu_scaling.py sweeps/transfer [--metric mean_train_loss|final_train_loss|val_loss]

Reads <sweep>/results.jsonl (scripts/sweep.py), averages over seeds, marks each width's optimum,
draws diverged runs as x at the top, and writes <sweep>/transfer.png and <sweep>/transfer_summary.json:
per parametrization and width the optimal log2 lr (grid argmin, and the vertex of a quadratic fitted
to the argmin and its two neighbours), the optimum's shift across widths, and the loss of every width
at the LR that is best on average. The curves are the values of the axis the sweep varied besides the
LR: width, depth, steps (training length, --max_steps; "200 steps") or batch (the global
--train_batch_size; "batch 16"); the summary's "axis" names it. It needs two values of that axis per
parametrization and three LRs per value: one LR, or two, cannot place an optimum (scripts/sweep.py
--lrs with at least three values).

An optimum at the smallest or largest LR tried for a width is an edge optimum ("edge": "low"/"high";
the true one lies beyond the grid and the fit there is no better): it is drawn as a triangle pointing
off the grid, the shift becomes a lower bound ("at_least") and the summary says which way to extend
the grid. Legends give the model width, n_head x head width; n_head comes from the results rows,
else from <sweep>/runs/<run>/config.json, else from --n_head, else the legend says "head width".
"""
import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from mupgpt.errors import ArgumentParser, UsageError, exit_on_usage_error

METRICS = ("mean_train_loss", "final_train_loss", "val_loss")
# axis -> (its key in the results rows, its sweep.py flag, what one value is called, more than one)
AXES = {"width": ("width", "--widths", "width", "widths"), "depth": ("depth", "--depths", "depth", "depths"),
        "steps": ("max_steps", "--steps", "training length", "training lengths"),
        "batch": ("train_batch_size", "--batch_sizes", "batch size", "batch sizes")}


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _row_problem(row, metric):
    """What is wrong with one results row, or None."""
    if not isinstance(row, dict):
        return "is not a JSON object"
    missing = [k for k in ("parametrization", "width", "lr", "seed", "diverged", metric) if k not in row]
    if missing:
        return f"has no {', '.join(missing)}"
    if row["parametrization"] not in ("mup", "sp"):
        return f"has parametrization {row['parametrization']!r}, not mup or sp"
    for key in ("width", "depth", "seed", "n_head", "steps", "max_steps", "train_batch_size"):
        v = row.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return f"has {key} {v!r}, not a whole number"
    if not row["width"]:
        return "has width 0"
    if not (_number(row["lr"]) and math.isfinite(row["lr"]) and row["lr"] > 0):
        return f"has lr {row['lr']!r}, not a positive number"
    if row[metric] is not None and not _number(row[metric]):
        return f"has {metric} {row[metric]!r}, not a number"
    if not isinstance(row["diverged"], bool):
        return f"has diverged {row['diverged']!r}, not true or false"
    if not row["diverged"] and not (_number(row[metric]) and math.isfinite(row[metric])):
        return f"has {metric} {row[metric]!r} for a run that did not diverge (it would be drawn as diverged)"
    return None


RUN_KEYS = ("parametrization", "width", "depth", "max_steps", "train_batch_size", "lr", "seed")


def load(sweep, metric):
    path = Path(sweep) / "results.jsonl"
    if Path(sweep).is_file():
        raise UsageError(f"{sweep} is a file: give the sweep's folder (scripts/sweep.py --out)")
    if not path.exists():
        raise UsageError(f"{path} not found: run scripts/sweep.py --out {sweep} first")
    if not path.is_file():
        raise UsageError(f"{path} is a folder, not the sweep's results file: give the sweep's folder")
    redo = f"run scripts/sweep.py --out {sweep} with the sweep's flags again to rewrite it from the runs"
    rows, lines = [], {}
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise UsageError(f"{path} line {i} is not JSON: {redo}") from None
                if isinstance(row, dict) and metric not in row and all(metric not in r for r in rows):
                    raise UsageError(f"results have no {metric!r}: use one of {', '.join(METRICS)}")
                problem = _row_problem(row, metric)
                if problem:
                    raise UsageError(f"{path} line {i} {problem}: {redo}")
                run = tuple(row.get(k) for k in RUN_KEYS)  # one row per run: a repeat would be averaged in
                if run in lines:
                    raise UsageError(f"{path} line {i} repeats the run of line {lines[run]}: {redo}")
                lines[run] = i
                rows.append(row)
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text: {redo}") from None
    if not rows:
        raise UsageError(f"{path} is empty: no run of the sweep has finished")
    varied = varied_axes(rows)
    if len(varied) > 1:
        raise UsageError(f"{path} varies both {varied[0]} and {varied[1]}: plot a sweep over one of them "
                         "(one folder each)")
    return rows


def varied_axes(rows):
    """The axes (width, depth, steps, batch) with more than one value in the rows; older rows lack steps and batch."""
    return [axis for axis, (key, *_) in AXES.items() if len({r.get(key) for r in rows}) > 1]


def check_grid(tab, axis, path, metric):
    """A transfer plot needs two sizes per parametrization and three LRs per size (an optimum with a
    neighbour on each side), and some run that did not diverge."""
    _, flag, one, many = AXES[axis]
    for p, sizes in tab.items():
        if len(sizes) < 2:
            raise UsageError(f"{path} has {p} runs at one {one} only ({next(iter(sizes))}): the plot compares the "
                             f"optimal LR across {many}: sweep at least two {flag}")
        for s, curve in sizes.items():
            if len(curve) < 3:
                raise UsageError(f"{path} has {len(curve)} learning rate(s) for {p} at {size_label(axis, s)}: "
                                 "an optimum needs "
                                 "at least 3 (one on each side of it): sweep at least three --lrs")
    if not any(math.isfinite(v) for sizes in tab.values() for c in sizes.values() for v in c.values()):
        raise UsageError(f"every run in {path} diverged or has no {metric}: nothing to plot: sweep lower --lrs")


def check_out(out):
    """A PNG (or another format matplotlib writes) path whose folder exists."""
    from matplotlib.backend_bases import FigureCanvasBase
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder: give a file name, e.g. {path / 'transfer.png'}")
    if not path.absolute().parent.is_dir():
        raise UsageError(f"--out {out}: {path.absolute().parent} is not a folder: create it first or give another path")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise UsageError(f"--out {out}: give a file name ending in .png (or another image format: "
                         f"{', '.join(sorted(formats))})")


def find_n_head(rows, sweep, given=0):
    """The runs' n_head: from the rows, else a run's config.json, else `given`; None if nowhere."""
    for r in rows:
        if r.get("n_head"):
            return int(r["n_head"])
    for r in rows:
        cfg = Path(sweep) / "runs" / str(r.get("run", "")) / "config.json"
        if r.get("run") and cfg.is_file():
            try:
                return int(json.loads(cfg.read_text())["resolved"]["model"]["n_head"])
            except (ValueError, KeyError, TypeError):
                continue
    return given or None


def describe(rows, n_head, axis="width"):
    """The settings every curve shares, for the figure: seeds, steps (unless they are the axis), and the model
    width of a sweep along another axis."""
    seeds = sorted({r["seed"] for r in rows})
    parts = [f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(map(str, seeds))}"]
    steps = sorted({r["steps"] for r in rows if r.get("steps") and not r["diverged"]})
    if steps and axis != "steps":
        parts.append(f"{steps[0]} steps" if len(steps) == 1 else f"{steps[0]}-{steps[-1]} steps")
    widths = sorted({r["width"] for r in rows})
    if axis != "width" and len(widths) == 1:
        w = widths[0]
        parts.append(f"width {n_head * w} ({n_head} heads x {w})" if n_head else f"head width {w}")
    elif n_head:
        parts.append(f"width = {n_head} heads x head width")
    return parts


def size_label(axis, sizes, n_head=None):
    """'width 256' for head width 64 and 4 heads ('width 256 and 512' for several); 'head width 64' without n_head;
    'depth 4', '200 steps' ('200 and 800 steps'), 'batch 16'."""
    sizes = sizes if isinstance(sizes, list) else [sizes]
    if axis == "depth":
        return "depth " + " and ".join(map(str, sizes))
    if axis == "steps":
        return " and ".join(map(str, sizes)) + " steps"
    if axis == "batch":
        return "batch " + " and ".join(map(str, sizes))
    if n_head:
        return "width " + " and ".join(str(n_head * s) for s in sizes)
    return "head width " + " and ".join(map(str, sizes))


def table(rows, metric):
    """{parametrization: {size: {log2 lr: mean loss over seeds, inf if any seed diverged}}} and the size axis."""
    axis = (varied_axes(rows) or ["width"])[0]
    key = AXES[axis][0]
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        loss = r[metric]
        bad = r["diverged"] or loss is None or not math.isfinite(loss)
        acc[r["parametrization"]][r[key]][math.log2(r["lr"])].append(math.inf if bad else loss)
    out = {p: {s: {x: float(np.mean(v)) for x, v in sorted(lrs.items())} for s, lrs in sorted(sizes.items())}
           for p, sizes in acc.items()}
    return out, axis


def optimum(curve):
    """(grid argmin log2 lr, quadratic-fit vertex around it, edge) of one width's {log2 lr: loss};
    edge is "low" or "high" when the argmin is the smallest or largest LR tried, else None."""
    xs = np.array(sorted(curve))
    ys = np.array([curve[x] for x in xs])
    if not np.isfinite(ys).any():
        return None, None, None
    i = int(np.nanargmin(np.where(np.isfinite(ys), ys, np.nan)))
    edge = "low" if i == 0 else "high" if i == len(xs) - 1 else None
    if 0 < i < len(xs) - 1 and np.isfinite(ys[i - 1:i + 2]).all():
        a, b, _ = np.polyfit(xs[i - 1:i + 2], ys[i - 1:i + 2], 2)
        vertex = float(-b / (2 * a)) if a > 0 else float(xs[i])
    else:
        vertex = float(xs[i])  # at the edge of the grid: the fit would extrapolate
    return float(xs[i]), vertex, edge


def shift(best, step):
    """The optimum's move across sizes: a lower bound when any size's optimum is at the grid's edge
    (the true optimum there lies further out, which can only widen the spread)."""
    found = [b for b in best.values() if b["grid_log2_lr"] is not None]
    if not found:
        return {"grid_steps": None, "fit_log2": None, "at_least": False, "extend": None}
    grid = [b["grid_log2_lr"] for b in found]
    fits = [b["fit_log2_lr"] for b in found]
    low = [b["grid_log2_lr"] for b in found if b["edge"] == "low"]
    high = [b["grid_log2_lr"] for b in found if b["edge"] == "high"]
    extend = [f"lower LRs below 2^{min(low):g}"] if low else []
    extend += [f"higher LRs above 2^{max(high):g}"] if high else []
    return {"grid_steps": (max(grid) - min(grid)) / step, "fit_log2": max(fits) - min(fits),
            "at_least": bool(low or high), "extend": " and ".join(extend) or None}


def shift_text(s, axis, n_head, why=True):
    """'3 grid steps', or 'at least 3 grid steps (optimum at the grid's low edge at width 2048: extend the grid
    below 2^-13)'; without the parenthesis if not why."""
    sh = s["shift"]
    if sh["grid_steps"] is None:
        return "unknown (every run diverged)"
    text = f"{sh['grid_steps']:g} grid step{'' if sh['grid_steps'] == 1 else 's'}"
    if not sh["at_least"]:
        return text
    if not why:
        return f"at least {text}"
    where, beyond = [], []
    for side, word in (("low", "below"), ("high", "above")):
        at = {int(k): b["grid_log2_lr"] for k, b in s["optimum"].items() if b["edge"] == side}
        if at:
            where.append(f"the grid's {side} edge at {size_label(axis, sorted(at), n_head)}")
            x = min(at.values()) if side == "low" else max(at.values())
            beyond.append(f"{word} 2^{x:g}")
    return f"at least {text} (optimum at {', '.join(where)}: extend the grid {' and '.join(beyond)})"


def summarize(tab, axis, n_head=None):
    summary = {"axis": axis, "n_head": n_head}
    for p, sizes in tab.items():
        grid_lrs = sorted({x for c in sizes.values() for x in c})
        step = float(np.median(np.diff(grid_lrs))) if len(grid_lrs) > 1 else 1.0
        best = {str(s): {**dict(zip(("grid_log2_lr", "fit_log2_lr", "edge"), optimum(c))),
                         "label": size_label(axis, s, n_head)} for s, c in sizes.items()}
        mean_curve = {x: np.mean([c.get(x, math.inf) for c in sizes.values()]) for x in grid_lrs}
        common = min(mean_curve, key=mean_curve.get)
        at_common = {str(s): c.get(common) for s, c in sizes.items()}
        losses = [at_common[str(s)] for s in sorted(sizes)]
        summary[p] = {
            "optimum": best, "grid_step_log2": step, "shift": shift(best, step),
            "best_common_log2_lr": common, "loss_at_best_common_lr": at_common,
            "wider_is_better_at_best_common_lr": all(a > b for a, b in zip(losses, losses[1:])),
        }
    return summary


def plot(tab, axis, summary, path, metric, label="", settings=()):
    """Draws the figure to `path`; returns its panel titles, legend labels per panel and footer lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params = [p for p in ("mup", "sp") if p in tab]
    fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4.6), sharey=True, squeeze=False)
    finite = [v for p in params for c in tab[p].values() for v in c.values() if math.isfinite(v)]
    top = np.percentile(finite, 90) + 0.1 * (np.ptp(finite) or 1)
    bottom = min(finite) - 0.05 * (np.ptp(finite) or 1)
    cmap = plt.get_cmap("viridis")
    drawn = {"titles": [], "legends": {}, "footer": []}
    for ax, p in zip(axes[0], params):
        sizes = sorted(tab[p])
        for k, s in enumerate(sizes):
            color = cmap(k / max(1, len(sizes) - 1))
            xs = sorted(tab[p][s])
            ys = [tab[p][s][x] for x in xs]
            best = summary[p]["optimum"][str(s)]
            edge = best["edge"]
            ax.plot(xs, [y if math.isfinite(y) else np.nan for y in ys], marker="o", ms=3, color=color,
                    label=best["label"] + (f" (optimum at {edge} edge)" if edge else ""))
            bad = [x for x, y in zip(xs, ys) if not math.isfinite(y) or y > top]
            ax.plot(bad, [top] * len(bad), "x", color=color)
            if best["grid_log2_lr"] is not None:
                marker, ms = {"low": ("<", 10), "high": (">", 10)}.get(edge, ("*", 12))
                ax.plot([best["grid_log2_lr"]], [tab[p][s][best["grid_log2_lr"]]], marker, ms=ms, color=color,
                        markeredgecolor="k")
        name = label or ("muP" if p == "mup" else "SP")
        ax.set_title(f"{name}: optimum moves {shift_text(summary[p], axis, summary['n_head'], why=False)}", fontsize=11)
        ax.set_xlabel("log2 learning rate")
        ax.set_ylim(bottom, top * 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        drawn["titles"].append(ax.get_title())
        drawn["legends"][p] = [t.get_text() for t in ax.get_legend().get_texts()]
    axes[0][0].set_ylabel(metric.replace("_", " "))
    step = summary[params[0]]["grid_step_log2"]
    edges = any(b["edge"] for p in params for b in summary[p]["optimum"].values())
    marks = [f"*: optimum per {AXES[axis][2]}", "x: diverged, or above the top of the chart"]
    if edges:
        marks.insert(1, "< >: optimum at the grid's low / high edge (the true one lies beyond: extend the grid)")
    drawn["footer"] = [
        "    ".join(marks),
        "    ".join([f"LR grid step {2 ** step:g}x ({step:g} in log2)", *settings])]
    fig.text(0.5, 0.035, drawn["footer"][0], ha="center", fontsize=7.5)
    fig.text(0.5, 0.006, drawn["footer"][1], ha="center", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def make(sweep, metric="mean_train_loss", out="", label="", n_head=0):
    """Plot and summary of one sweep folder; returns (summary, what the figure shows)."""
    if out:
        check_out(out)
    rows = load(sweep, metric)
    n_head = find_n_head(rows, sweep, n_head)
    tab, axis = table(rows, metric)
    check_grid(tab, axis, Path(sweep) / "results.jsonl", metric)
    summary = summarize(tab, axis, n_head)
    summary["metric"] = metric
    png = out or str(Path(sweep) / "transfer.png")
    drawn = plot(tab, axis, summary, png, metric, label, describe(rows, n_head, axis))
    with open(Path(sweep) / "transfer_summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    for par in ("mup", "sp"):
        if par in summary:
            s = summary[par]
            sizes = size_label(axis, [int(k) for k in s["optimum"]], n_head).replace(" and ", " / ")
            lrs = " / ".join("-" if b["grid_log2_lr"] is None else f"{b['grid_log2_lr']:g}"
                             for b in s["optimum"].values())
            better = {"width": "wider", "depth": "deeper", "steps": "longer", "batch": "a larger batch"}[axis]
            print(f"{par}: optimal log2 lr at {sizes}: {lrs}, shift {shift_text(s, axis, n_head)}; "
                  f"{better} is better at the best common lr: {s['wider_is_better_at_best_common_lr']}")
    print(f"-> {png}, {Path(sweep) / 'transfer_summary.json'}")
    return summary, drawn


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a sweep folder made by scripts/sweep.py (its results.jsonl)")
    p.add_argument("--metric", default="mean_train_loss", choices=METRICS, help="the loss each run is judged by")
    p.add_argument("--out", default="", help="PNG path (default <sweep>/transfer.png)")
    p.add_argument("--label", default="", help="panel title instead of muP / SP (e.g. the depth rule of a depth sweep)")
    p.add_argument("--n_head", type=int, default=0,
                   help="the runs' n_head, for model widths in the legend when neither the results rows nor "
                        "<sweep>/runs/*/config.json give it")
    args = p.parse_args()
    if args.n_head < 0:
        raise UsageError(f"--n_head must be positive, not {args.n_head}")
    make(args.sweep, args.metric, args.out, args.label, args.n_head)


if __name__ == "__main__":
    exit_on_usage_error(main)
