"""A sweep's runs on disk: each grid point's run folder name, and a finished run's row of results.jsonl."""
import json
import math

from mupgpt.errors import UsageError


def run_name(point):
    """The run folder of a grid point: what sets it apart from the sweep's other runs."""
    depth = f"_d{point['depth']}" if point["depth"] else ""
    steps = f"_steps{point['max_steps']}" if point["max_steps"] else ""
    batch = f"_batch{point['train_batch_size']}" if point["train_batch_size"] else ""
    return f"{point['parametrization']}_w{point['width']}{depth}{steps}{batch}_lr{point['lr']:g}_s{point['seed']}"


def _read_json(path, what):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{path} is unreadable: {what}") from None


def result_row(point, run_dir):
    """A finished run's row, from its own summary.json and metrics.jsonl. A torn last metrics line (a killed
    write) is left out; a row logged again after a resume replaces the earlier one of its step."""
    summary = _read_json(run_dir / "summary.json", f"delete {run_dir} and run the sweep again to redo that run")
    if not isinstance(summary, dict) or not all(k in summary for k in ("final_train_loss", "final_val_loss",
                                                                       "diverged", "steps")):
        raise UsageError(f"{run_dir / 'summary.json'} is not a run summary: delete {run_dir} and run the sweep again")
    by_step = {}
    try:
        with open(run_dir / "metrics.jsonl") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
    except OSError:
        pass
    rows = [by_step[k] for k in sorted(by_step)]
    train = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    tail = train[-max(1, len(train) // 4):]  # the last quarter of logged steps
    finite = all(math.isfinite(x) for x in tail)
    final, val = summary["final_train_loss"], summary["final_val_loss"]
    if not summary["diverged"]:  # a finished run's losses are numbers: where its summary lacks them, its log has them
        if not isinstance(final, (int, float)) or not math.isfinite(final):
            final = train[-1] if train else final
        vals = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))]
        if (not isinstance(val, (int, float)) or not math.isfinite(val)) and vals:
            val = vals[-1]
    mean = (sum(tail) / len(tail) if finite else float("nan")) if tail else final
    return {**point, "run": run_dir.name, "final_train_loss": final, "mean_train_loss": mean,
            "val_loss": val, "diverged": bool(summary["diverged"]) or not finite, "steps": summary["steps"]}
