"""PNG curves of a run: reward, entropy, turns, tool calls, response length, per-phase time."""

from __future__ import annotations

import os
from pathlib import Path

from trainer.metrics import STEP_PHASES, read_metrics

PANELS = [
    ("reward", ["reward/score", "reward/acc", "reward/tool", "reward/format"]),
    ("entropy", ["actor/entropy"]),
    ("num_turns", ["rollout/num_turns"]),
    ("tool_calls", ["rollout/tool_calls", "rollout/tool_errors"]),
    ("response_length", ["rollout/response_tokens"]),
    ("validation", ["val/acc", "val/acc_no_tool", "val/tool_use", "val/box_holds_target", "val/grounding_iou"]),
]


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what exists)."""
    out = []
    for i in range(len(ys)):
        chunk = ys[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def render_plots(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write plots/curves.png (one panel per metric group) and plots/timing.png; return the paths."""
    import matplotlib  # matplotlib: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: only when plotting

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"no metrics in {run_dir / 'metrics.jsonl'}: is this a run folder?")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            xs, ys = zip(*pts)
            line, = ax.plot(xs, ys, marker="o", ms=2, lw=0.8, alpha=0.45 if len(pts) > 8 else 1.0, label=key)
            if len(pts) > 8:  # a batch of a few prompts is noisy: draw the trend over 5 steps too
                ax.plot(xs, moving_average(ys, 5), color=line.get_color(), lw=2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"GRPO run: {run_dir.name}")
    fig.tight_layout()
    curves = out / "curves.png"
    fig.savefig(curves, dpi=90)
    plt.close(fig)

    steps = [r for r in rows if "timing/step_s" in r]
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(steps)
    for phase in STEP_PHASES:
        vals = [r.get(f"timing/{phase}_s", 0.0) for r in steps]
        ax.bar([r["step"] for r in steps], vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.set_title("time per step by phase")
    ax.legend(loc="upper left")
    shares = [(key, label) for key, label in [("timing/trainer_idle_share", "trainer idle share"),
                                              ("timing/rollout_idle_share", "rollout idle share"),
                                              ("async/staleness_mean", "staleness (versions)")]
              if any(key in r for r in steps)]
    if shares:  # how much of the step the trainer waits, and how old the trained episodes were
        ax2 = ax.twinx()
        for key, label in shares:
            ax2.plot([r["step"] for r in steps], [r.get(key, 0.0) for r in steps], marker="o", ms=3, lw=1.2,
                     label=label)
        ax2.set_ylim(bottom=0)
        ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    timing = out / "timing.png"
    fig.savefig(timing, dpi=90)
    plt.close(fig)
    return [curves, timing]


def render_eval_bars(results: dict, out_dir: str | os.PathLike[str]) -> list[Path]:
    """One PNG per benchmark: Avg@k per category (and overall), one bar per mode (with / without
    the tool) side by side; `results` is eval.json's "benchmarks" ({bench: {mode: summary}})."""
    import matplotlib  # matplotlib: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: only when plotting

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for bench, modes in results.items():
        cats = sorted({c for s in modes.values() for c in s["categories"]}) + ["all"]
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cats), 3.6))
        width = 0.8 / max(len(modes), 1)
        for j, (mode, s) in enumerate(modes.items()):
            ys = [s["categories"].get(c, {}).get("avg@k", 0.0) if c != "all" else s["avg@k"] for c in cats]
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(cats))]
            bars = ax.bar(xs, ys, width, label=f"{mode.replace('_', ' ')} (Avg@{s['k']})")
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(cats)), cats)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{bench}: with vs without the zoom tool")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"{bench}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
