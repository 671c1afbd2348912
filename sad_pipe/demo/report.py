"""The demo's report: what the teacher, the cache and each student run measured, side by side.

Inputs are the files the real commands wrote (cache manifest, each run's result.json and
metrics.jsonl); nothing here trains or measures on its own.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from sad_pipe.errors import SadPipeError

METHOD_ORDER = ["ce", "full", "subset", "tail", "sampled", "hybrid", "curriculum"]
METHOD_NAMES = {
    "ce": "CE only (no teacher)", "full": "online full-vocab KD (teacher in memory)",
    "subset": "cached top-256 subset KD", "tail": "cached top-256 + tail KD",
    "sampled": "cached sampled KD (32 draws)", "hybrid": "cached top-256 + 32 tail draws (hybrid) KD",
    "curriculum": "cached curriculum (hybrid KD + feature + relation)",
}
CACHED = ("subset", "tail", "sampled", "hybrid", "curriculum")


def _json(path: Path) -> dict:
    if not path.exists():
        raise SadPipeError(f"{path} is missing: run the demo's earlier steps first (make all)")
    return json.loads(path.read_text())


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _runs(students: Path) -> dict[str, dict[str, Path]]:
    """{variant: {method: run_dir}} for every finished run (one with result.json)."""
    out: dict[str, dict[str, Path]] = {}
    for result in sorted(students.glob("*/*/result.json")):
        out.setdefault(result.parent.parent.name, {})[result.parent.name] = result.parent
    return out


def _ordered(methods) -> list[str]:
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


def _pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def build_report(demo: Path) -> str:
    """Write demo/report.md and demo/plots/*.png; return the report text."""
    cache_manifest = _json(demo / "cache" / "manifest.json")
    summary = cache_manifest["summary"]
    teacher_result = _json(demo / "teacher" / "result.json")
    runs = _runs(demo / "students")
    plots = _plots(demo, runs)
    ident = cache_manifest["identity"]
    t = ident["teacher"]
    lines = [
        "# sad-pipe demo report", "",
        "Everything below was measured by the `make all` run that wrote this file "
        "(2-core CPU unless stated otherwise). Students of one variant share init, data order and step count, "
        "so differences between methods are paired.", "",
        "## Teacher", "",
        f"- {t['architecture']}: {t['num_layers']} layers x {t['hidden_size']}, vocab {t['vocab_size']}, "
        f"{teacher_result['student_parameters']:,} parameters; trained from scratch by `sad-pipe train-student` "
        f"in CE-only mode for {teacher_result['steps']} optimizer steps ({teacher_result['train_seconds'] / 60:.1f} min).",
        f"- Eval CE {summary.get('teacher_eval_ce', float('nan')):.4f} (perplexity "
        f"{math.exp(summary.get('teacher_eval_ce', float('nan'))):.1f}), top-1 accuracy {summary.get('teacher_eval_top1', float('nan')):.3f}, "
        "measured by stage one on the eval split (the teacher's log-prob of each true next token).", "",
        "## Cache", "",
        f"- cache id `{summary['cache_id']}`: {summary['tokens']:,} tokens ({summary['sequences']['train']:,} train / "
        f"{summary['sequences'].get('eval', 0):,} eval sequences of {ident['packing']['max_length']}), {summary['shards']} shards, "
        f"{_mib(summary['bytes'])} = {summary['bytes_per_token']:.0f} B/token.",
        f"- top-{ident['top_k']} probability mass kept: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.get("topk_mass", {}).items())
        + " (the rest is what the tail bucket stands for).",
        f"- built in {summary['wall_seconds']:.0f} s; teacher {summary.get('teacher_tokens_per_second') or 0:,.0f} tokens/s.", "",
        "| array | B/token |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in summary["bytes_per_token_by_array"].items() if not k.endswith(".json")], "",
        "## Students", "",
    ]
    verdicts = []
    for variant, methods in runs.items():
        res = {m: _json(p / "result.json") for m, p in methods.items()}
        params = next(iter(res.values()))["student_parameters"]
        steps = {r["steps"] for r in res.values()}
        lines += [f"### {variant} ({params:,} parameters, {'/'.join(map(str, sorted(steps)))} steps)", "",
                  "| method | eval CE | perplexity | top-1 agreement | vs CE only | vs online full KD | train time | peak memory | tokens/s | cache id |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for m in _ordered(res):
            r = res[m]
            ce = r.get("eval/ce", float("nan"))
            vs_ce = f"{_pct(ce, res['ce']['eval/ce']):+.1f}%" if "ce" in res and m != "ce" else ""
            vs_full = f"{_pct(ce, res['full']['eval/ce']):+.1f}%" if "full" in res and m != "full" else ""
            agree = r.get("eval/agreement")
            lines.append(f"| {METHOD_NAMES.get(m, m)} | {ce:.4f} | {r.get('eval/perplexity', float('nan')):.1f} | "
                         f"{'' if agree is None else f'{agree:.3f}'} | {vs_ce} | {vs_full} | {r['train_seconds']:.0f} s | "
                         f"{_mib(r['peak_memory_bytes'])} | {r.get('tokens_per_second') or 0:,.0f} | `{r['cache_id']}` |")
        lines.append("")
        verdicts += _verdicts(variant, res)
    cached_ids = {_json(p / "result.json")["cache_id"] for methods in runs.values() for m, p in methods.items() if m in CACHED}
    lines += ["## Goals, as measured", "", *verdicts,
              f"- One cache for all variants: cached runs used cache id(s) {', '.join(f'`{i}`' for i in sorted(cached_ids))}"
              f" {'(the same one)' if len(cached_ids) == 1 else '(NOT the same)'}.", ""]
    lines += ["## Curves", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    text = "\n".join(lines)
    (demo / "report.md").write_text(text)
    return text


def _verdicts(variant: str, res: dict[str, dict]) -> list[str]:
    out = []
    cached = {m: res[m]["eval/ce"] for m in CACHED if m in res}
    if not cached:
        return out
    best = min(cached, key=cached.get)
    if "ce" in res:
        gain = -_pct(cached[best], res["ce"]["eval/ce"])
        out.append(f"- {variant}: best cached form ({best}) vs CE only at equal steps: {gain:.1f}% lower eval CE "
                   f"({'meets' if gain >= 5 else 'MISSES'} the >= 5% goal).")
    if "full" in res:
        gap = _pct(cached[best], res["full"]["eval/ce"])
        out.append(f"- {variant}: best cached form ({best}) vs online full-vocabulary KD: {gap:+.2f}% eval CE "
                   f"({'meets' if gap <= 1 else 'MISSES'} the 'within 1% or better' goal).")
    for form in ("hybrid", "tail"):
        if "subset" in cached and form in cached:
            out.append(f"- {variant}: {form} vs subset: {_pct(cached[form], cached['subset']):+.2f}% eval CE "
                       "(one seed; `make compare` gives the spread).")
    return out


def _plots(demo: Path, runs: dict[str, dict[str, Path]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = demo / "plots"
    out_dir.mkdir(exist_ok=True)
    paths = []
    for variant, methods in runs.items():
        fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(13, 4.5))
        for m in _ordered(methods):
            rows = _metrics(methods[m])
            ev = [r for r in rows if r.get("split") == "eval" and "eval/ce" in r]
            tr = [r for r in rows if r.get("split") != "eval" and r.get("loss/ce") is not None]
            ax_eval.plot([r["step"] for r in ev], [r["eval/ce"] for r in ev], marker="o", label=m)
            ax_train.plot([r["step"] for r in tr], [r["loss/ce"] for r in tr], label=m, alpha=0.8)
        for ax, title in ((ax_eval, "eval CE"), (ax_train, "train CE (raw component)")):
            _label(ax, f"{variant}: {title}", 8)
        paths.append(_save(fig, out_dir / f"{variant}-ce.png", 100))

        fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.6), squeeze=False)
        for ax, m in zip(axes[0], _ordered(methods)):
            rows = [r for r in _metrics(methods[m]) if r.get("split") != "eval"]
            for key in sorted({k for r in rows for k in r if k.startswith("loss/") and k not in ("loss/agreement",)}):
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key[5:])
            _label(ax, f"{variant} / {m}", 7)
        paths.append(_save(fig, out_dir / f"{variant}-components.png", 90))
    return paths


def _label(ax, title: str, legend_size: int) -> None:
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=legend_size)


def _save(fig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


BASELINE_NAMES = {"ce": "CE only", "full": "online full KD"}


def build_comparison(root: Path, baselines: tuple[str, ...] = ("ce", "full"), within: float = 1.0) -> str:
    """`make compare`: paired differences of eval CE over seeds (root/seed-*/<method>/result.json) against each
    of `baselines`, with the worst seed and whether every seed is within `within` % of the last baseline, and
    the teacher the cache came from (its top-k mass and CE, from the cache's manifest). `make compare-hidden`
    pairs the hidden-state modes with the bf16 run (baselines ("bf16",), within 0.5)."""
    per_seed: dict[str, dict[str, float]] = {}
    any_run = None
    for result in sorted(root.glob("seed-*/*/result.json")):
        per_seed.setdefault(result.parent.parent.name, {})[result.parent.name] = _json(result)["eval/ce"]
        any_run = any_run or result.parent
    methods = _ordered({m for v in per_seed.values() for m in v})
    lines = ["# sad-pipe demo: method comparison over seeds", ""]
    if any_run is not None and (any_run / "config.json").exists():
        lines += [_teacher_line(any_run), ""]
    lines += [f"Seeds: {', '.join(sorted(per_seed))}. Each seed changes the student init and the data order; within a seed "
              "every method shares both, so differences are paired. Eval CE (nats/token):", "",
              "| method | " + " | ".join(sorted(per_seed)) + " | mean |", "|---|" + "---:|" * (len(per_seed) + 1)]
    for m in methods:
        vals = [per_seed[s].get(m) for s in sorted(per_seed)]
        got = [v for v in vals if v is not None]
        lines.append(f"| {m} | " + " | ".join("" if v is None else f"{v:.4f}" for v in vals) + f" | {statistics.mean(got):.4f} |")
    last = baselines[-1]
    last_name = "full KD" if last == "full" else BASELINE_NAMES.get(last, last)
    lines += ["", "Paired differences (mean +- standard deviation over seeds, [best, worst seed]):", "",
              "| method | " + " | ".join(f"vs {BASELINE_NAMES.get(b, b)}" for b in baselines)
              + f" | within {within:g}% of {last_name} on every seed |", "|---|" + "---:|" * len(baselines) + "---|"]
    for m in methods:
        cells, worst = [], None
        for base in baselines:
            diffs = [_pct(v[m], v[base]) for v in per_seed.values() if m in v and base in v and m != base]
            if not diffs:
                cells.append("")
                continue
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            cells.append(f"{statistics.mean(diffs):+.2f}% +- {spread:.2f} [{min(diffs):+.2f}, {max(diffs):+.2f}] (n={len(diffs)})")
            if base == last:
                worst = max(diffs)
        verdict = "" if worst is None or m == "ce" else ("yes" if worst <= within else f"no (worst {worst:+.2f}%)")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {verdict} |")
    text = "\n".join(lines) + "\n"
    (root / "compare.md").write_text(text)
    return text


def _teacher_line(run: Path) -> str:
    """The teacher behind a run's cache: top-k mass at each cached T, eval CE (its profile at k=16/64 when the
    cache was built from a profiled teacher)."""
    cache = Path(json.loads((run / "config.json").read_text())["cache"]["path"])
    if not (cache / "manifest.json").exists():
        return f"Cache {cache} (no manifest)."
    manifest = json.loads((cache / "manifest.json").read_text())
    summary, teacher = manifest["summary"], manifest["identity"]["teacher"] or {}
    mass = ", ".join(f"{k} {v:.3f}" for k, v in summary.get("topk_mass", {}).items())
    profile = ""
    profile_file = Path(teacher.get("model", "")) / "profile.json"
    if profile_file.exists():
        prof = json.loads(profile_file.read_text())
        profile = (" Profile on held-out text: top-16/64/256 mass " + " / ".join(f"{prof['mass_T1'][k]:.3f}" for k in
                   ("16", "64", "256")) + f" at T=1, entropy {prof['entropy_T1']:.2f} nats.")
    return (f"Teacher `{teacher.get('model')}` (cache `{summary.get('cache_id')}`): eval CE "
            f"{summary.get('teacher_eval_ce', float('nan')):.3f}; top-{manifest['identity']['top_k']} mass {mass}.{profile}")
