"""PNG plots of a run's metrics.jsonl: every loss component (raw and weighted), lr (and the fp16 loss scale),
the skipped steps, eval metrics."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") != "eval"]
    evals = [r for r in rows if r.get("split") == "eval"]
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [("loss/", "raw loss components"), ("weighted/", "weighted components"), ("weight/", "curriculum weights")]
    for ax, (prefix, title) in zip(axes.flat, panels):
        keys = sorted({k for r in train for k in r if k.startswith(prefix) and r[k] is not None})
        for k in keys:
            pts = [(r["step"], r[k]) for r in train if r.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k[len(prefix):])
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if keys:
            ax.legend(fontsize=8)
    # Skipped steps (a non-finite loss, or an fp16 overflow) as red lines on the raw losses, whose line
    # has a gap there (the loss was not finite) or a step the weights never took.
    skipped = [r["step"] for r in train if r.get("nonfinite") or r.get("overflow")]
    for step in skipped:
        axes.flat[0].axvline(step, color="red", alpha=0.3, linewidth=1)
    if skipped:
        axes.flat[0].set_title(f"raw loss components ({len(skipped)} skipped steps in red)")
    ax = axes.flat[3]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray")
    ax.set_title("learning rate")
    ax.set_xlabel("optimizer step")
    scales = [(r["step"], r["loss_scale"]) for r in train if r.get("loss_scale")]
    if scales:  # fp16: the grad scaler's scale, halved at every overflow
        twin = ax.twinx()
        twin.step([p[0] for p in scales], [p[1] for p in scales], where="post", color="tab:orange")
        twin.set_yscale("log", base=2)
        twin.set_ylabel("fp16 loss scale", color="tab:orange")
        ax.set_title("learning rate and fp16 loss scale")
    fig.tight_layout()
    paths = [out_dir / "losses.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    if evals:
        keys = sorted({k for r in evals for k in r if k.startswith("eval/") and k != "eval/perplexity"})
        fig, ax = plt.subplots(figsize=(8, 5))
        for k in keys:
            pts = [(r["step"], r[k]) for r in evals if r.get(k) is not None]  # null: a non-finite figure
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k[5:])
        ax.set_title("eval (weights of the same step)")
        ax.set_xlabel("optimizer step")
        if keys:
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "eval.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
