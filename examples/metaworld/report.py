"""The study's numbers: success rates with Wilson intervals, the markdown table and the plot.

Runs with keras_openpi (`.venv`); `python report.py RESULTS.json` rewrites the table
(`RESULTS.md`) and the plot (`RESULTS.png`) from a results file.
"""

import argparse
import json
import math
import pathlib
import sys

Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval


def wilson(successes, trials, z=Z95):
    """Wilson's score interval of a binomial proportion: `(low, high)`; `(0, 1)` without trials.

    Example:
    >>> [round(x, 3) for x in wilson(18, 20)]
    [0.699, 0.972]
    """
    if trials <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}.")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def pooled(evaluations):
    """Success counts pooled over evaluation results (`evaluate.py`'s), per task and in all.

    Returns:
        `{"successes", "episodes", "success_rate", "ci95": [low, high], "per_task":
        {task: {"successes", "episodes", "success_rate"}}}`.
    """
    per_task = {}
    for evaluation in evaluations:
        for name, task in evaluation["tasks"].items():
            entry = per_task.setdefault(name, {"successes": 0, "episodes": 0})
            entry["successes"] += task["successes"]
            entry["episodes"] += task["episodes"]
    for entry in per_task.values():
        entry["success_rate"] = entry["successes"] / entry["episodes"]
    successes = sum(e["successes"] for e in per_task.values())
    episodes = sum(e["episodes"] for e in per_task.values())
    return {
        "successes": successes,
        "episodes": episodes,
        "success_rate": successes / episodes if episodes else None,
        "ci95": [round(x, 4) for x in wilson(successes, episodes)],
        "per_task": per_task,
    }


def _rate(entry):
    if not entry or entry.get("episodes", 0) == 0:
        return "–"
    low, high = entry["ci95"]
    return (
        f"{entry['success_rate']:.2f} [{low:.2f}, {high:.2f}] "
        f"({entry['successes']}/{entry['episodes']})"
    )


def _mib(value):
    return "–" if value is None else f"{value / 2**20:.1f}"


def _step(entry):
    """`383 (0.21)`: ms per step and the fraction of the matmul's FLOP/s the step reached."""
    step, ratio = entry.get("step_seconds"), entry.get("step_ratio_to_matmul")
    if step is None:
        return "–"
    return f"{step * 1000:.0f}" + ("" if ratio is None else f" ({ratio:.2f})")


def markdown_table(results):
    """The study as markdown: one row per strategy (and the base policy)."""
    held_out = ", ".join(results["tasks"]["held_out"])
    lines = [
        f"Held-out tasks: {held_out}; success with its Wilson 95 % interval "
        "(successes/episodes, pooled over tasks and training seeds). Forgetting: the "
        "pretraining tasks' success after fine-tuning (base: "
        f"{_rate(results['base']['pretrain'])}).",
        "",
        "| strategy | held-out success | per task | trainable params | train step memory (MiB, XLA) "
        "| time per step, ms (of the matmul's FLOP/s) | pretraining tasks after fine-tuning |",
        "|---|---|---|---|---|---|---|",
    ]
    base = results["base"]
    per_task = " / ".join(
        f"{base['held_out']['per_task'][t]['success_rate']:.2f}"
        for t in results["tasks"]["held_out"]
    ) if base.get("held_out") else "–"
    lines.append(
        f"| base, not fine-tuned | {_rate(base.get('held_out'))} | {per_task} | – | – | – | "
        f"{_rate(base['pretrain'])} |"
    )
    for label, entry in results["strategies"].items():
        held = entry.get("held_out")
        per_task = " / ".join(
            f"{held['per_task'][t]['success_rate']:.2f}" for t in results["tasks"]["held_out"]
        ) if held else "–"
        lines.append(
            f"| {label} | {_rate(held)} | {per_task} | {entry.get('trainable_params', 0):,} | "
            f"{_mib(entry.get('train_step_bytes'))} | {_step(entry)} | "
            f"{_rate(entry.get('forgetting'))} |"
        )
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Held-out success vs trainable parameters, one point per strategy, with the intervals."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for label, entry in results["strategies"].items():
        held = entry.get("held_out")
        if not held or not held["episodes"]:
            continue
        x, y = entry["trainable_params"], held["success_rate"]
        low, high = held["ci95"]
        marker = "s" if entry.get("from") == "scratch" else "o"
        axes.errorbar(x, y, yerr=[[y - low], [high - y]], fmt=marker, capsize=3)
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_xscale("log")
    axes.set_ylim(-0.05, 1.05)
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel("held-out success rate (95 % Wilson)")
    axes.set_title(f"MetaWorld, {len(results['tasks']['held_out'])} held-out tasks "
                   f"({results['budget']['name']} budget)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def write_report(results, json_path):
    """Writes `json_path`, and the table (`.md`) and plot (`.png`) beside it; returns the table."""
    json_path = pathlib.Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results)
    json_path.with_suffix(".md").write_text(table)
    plot(results, json_path.with_suffix(".png"))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="a run_all.py results JSON")
    args = parser.parse_args(argv)
    results = json.loads(pathlib.Path(args.results).read_text())
    print(write_report(results, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
