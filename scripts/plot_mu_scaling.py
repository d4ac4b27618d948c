"""The muP transfer plot: loss against log2(learning rate), a curve per width, muP and SP side by side.

    python scripts/plot_mu_scaling.py sweeps/transfer [--metric mean_train_loss|final_train_loss|val_loss]

Reads <sweep>/results.jsonl (scripts/sweep.py), averages over seeds, marks each width's optimum,
draws diverged runs as x at the top, and writes <sweep>/transfer.png and <sweep>/transfer_summary.json:
per parametrization and width the optimal log2 lr (grid argmin, and the vertex of a quadratic fitted
to the argmin and its two neighbours), the optimum's shift across widths, and the loss of every width
at the LR that is best on average. If the sweep varies depth instead of width, the curves are depths.
"""
import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from mupgpt.errors import UsageError, exit_on_usage_error  # noqa: E402


def load(sweep, metric):
    path = Path(sweep) / "results.jsonl"
    if not path.exists():
        raise UsageError(f"{path} not found: run scripts/sweep.py --out {sweep} first")
    rows = [json.loads(l) for l in open(path) if l.strip()]
    if not rows:
        raise UsageError(f"{path} is empty: no run of the sweep has finished")
    if metric not in rows[0]:
        raise UsageError(f"results have no {metric!r}: use one of mean_train_loss, final_train_loss, val_loss")
    return rows


def table(rows, metric):
    """{parametrization: {size: {log2 lr: mean loss over seeds, inf if any seed diverged}}} and the size axis."""
    depths = {r.get("depth") for r in rows}
    axis = "depth" if len(depths) > 1 else "width"
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        loss = r[metric]
        bad = r["diverged"] or loss is None or not math.isfinite(loss)
        acc[r["parametrization"]][r[axis]][math.log2(r["lr"])].append(math.inf if bad else loss)
    out = {p: {s: {x: float(np.mean(v)) for x, v in sorted(lrs.items())} for s, lrs in sorted(sizes.items())}
           for p, sizes in acc.items()}
    return out, axis


def optimum(curve):
    """(grid argmin log2 lr, quadratic-fit vertex around it) of one width's {log2 lr: loss}."""
    xs = np.array(sorted(curve))
    ys = np.array([curve[x] for x in xs])
    if not np.isfinite(ys).any():
        return None, None
    i = int(np.nanargmin(np.where(np.isfinite(ys), ys, np.nan)))
    if 0 < i < len(xs) - 1 and np.isfinite(ys[i - 1:i + 2]).all():
        a, b, _ = np.polyfit(xs[i - 1:i + 2], ys[i - 1:i + 2], 2)
        vertex = float(-b / (2 * a)) if a > 0 else float(xs[i])
    else:
        vertex = float(xs[i])  # at the edge of the grid: the fit would extrapolate
    return float(xs[i]), vertex


def summarize(tab, axis):
    summary = {"axis": axis}
    for p, sizes in tab.items():
        grid_lrs = sorted({x for c in sizes.values() for x in c})
        step = float(np.median(np.diff(grid_lrs))) if len(grid_lrs) > 1 else 1.0
        best = {str(s): dict(zip(("grid_log2_lr", "fit_log2_lr"), optimum(c))) for s, c in sizes.items()}
        argmins = [b["grid_log2_lr"] for b in best.values() if b["grid_log2_lr"] is not None]
        fits = [b["fit_log2_lr"] for b in best.values() if b["fit_log2_lr"] is not None]
        mean_curve = {x: np.mean([c.get(x, math.inf) for c in sizes.values()]) for x in grid_lrs}
        common = min(mean_curve, key=mean_curve.get)
        at_common = {str(s): c.get(common) for s, c in sizes.items()}
        losses = [at_common[str(s)] for s in sorted(sizes)]
        summary[p] = {
            "optimum": best, "grid_step_log2": step,
            "shift_grid_steps": (max(argmins) - min(argmins)) / step if argmins else None,
            "shift_fit_log2": (max(fits) - min(fits)) if fits else None,
            "best_common_log2_lr": common, "loss_at_best_common_lr": at_common,
            "wider_is_better_at_best_common_lr": all(a > b for a, b in zip(losses, losses[1:])),
        }
    return summary


def plot(tab, axis, summary, path, metric, label=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params = [p for p in ("mup", "sp") if p in tab]
    fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4.2), sharey=True, squeeze=False)
    finite = [v for p in params for c in tab[p].values() for v in c.values() if math.isfinite(v)]
    top = np.percentile(finite, 90) + 0.1 * (np.ptp(finite) or 1)
    bottom = min(finite) - 0.05 * (np.ptp(finite) or 1)
    cmap = plt.get_cmap("viridis")
    for ax, p in zip(axes[0], params):
        sizes = sorted(tab[p])
        for k, s in enumerate(sizes):
            color = cmap(k / max(1, len(sizes) - 1))
            xs = sorted(tab[p][s])
            ys = [tab[p][s][x] for x in xs]
            ax.plot(xs, [y if math.isfinite(y) else np.nan for y in ys], marker="o", ms=3, color=color,
                    label=f"{axis} {s}")
            bad = [x for x, y in zip(xs, ys) if not math.isfinite(y) or y > top]
            ax.plot(bad, [top] * len(bad), "x", color=color)
            best = summary[p]["optimum"][str(s)]["grid_log2_lr"]
            if best is not None:
                ax.plot([best], [tab[p][s][best]], "*", ms=12, color=color, markeredgecolor="k")
        shift = summary[p]["shift_grid_steps"]
        name = label or ("muP" if p == "mup" else "SP")
        ax.set_title(f"{name}: optimum moves {shift:g} grid step(s)")
        ax.set_xlabel("log2 learning rate")
        ax.set_ylim(bottom, top * 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(metric.replace("_", " "))
    fig.text(0.5, 0.005, "*: optimum per " + axis + "    x: diverged, or above the top of the chart", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep")
    p.add_argument("--metric", default="mean_train_loss")
    p.add_argument("--out", default="", help="PNG path (default <sweep>/transfer.png)")
    p.add_argument("--label", default="", help="panel title instead of muP / SP (e.g. the depth rule of a depth sweep)")
    args = p.parse_args()
    tab, axis = table(load(args.sweep, args.metric), args.metric)
    summary = summarize(tab, axis)
    summary["metric"] = args.metric
    png = args.out or str(Path(args.sweep) / "transfer.png")
    plot(tab, axis, summary, png, args.metric, args.label)
    with open(Path(args.sweep) / "transfer_summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    for par in ("mup", "sp"):
        if par in summary:
            s = summary[par]
            print(f"{par}: optimal log2 lr per {axis} {[b['grid_log2_lr'] for b in s['optimum'].values()]}, "
                  f"shift {s['shift_grid_steps']:g} grid steps; wider is better at the best common lr: "
                  f"{s['wider_is_better_at_best_common_lr']}")
    print(f"-> {png}, {Path(args.sweep) / 'transfer_summary.json'}")


if __name__ == "__main__":
    exit_on_usage_error(main)
