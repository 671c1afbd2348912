"""results.json and results.md: the figures, how each was measured, on what machine, how long it took."""

from __future__ import annotations

from sad_pipe.bench.machine import summary_line
from sad_pipe.bench.measure import Figure, Table

SUMMARY_COLUMNS = ["benchmark", "figure", "median", "spread (min-max)", "n", "numerator ÷ denominator", "target", "met"]


def fmt_value(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3g}x"
    if unit == "nats":
        return f"{value:.2e}"
    return f"{value:,.0f} {unit}"


def _met(figure: Figure) -> str:
    return {None: "-", True: "yes", False: "**no**"}[figure.met]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(columns), "|" + "|".join("---" for _ in columns) + "|", *(_row(r) for r in rows)]


def summary_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, bench in results["benchmarks"].items():
        if bench.get("error"):
            rows.append([name, "failed: " + bench["error"].splitlines()[0], "-", "-", "-", "-", "-", "-"])
        for f in bench.get("figures_objects", []):
            ratio = f.numerator + (f" ÷ {f.denominator}" if f.denominator else "")
            target = "-" if not f.target else (f"1 ± {f.target[1]:g}" if f.target[0] == "within"
                                               else f"{f.target[0]} {fmt_value(f.target[1], f.unit)}")
            rows.append([name, f.name, fmt_value(f.median, f.unit),
                         f"{fmt_value(min(f.values), f.unit)} - {fmt_value(max(f.values), f.unit)}", str(len(f.values)),
                         ratio, target, _met(f)])
    return rows


def markdown(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        "# sad-pipe benchmarks", "",
        f"Machine: {summary_line(m)}. Device: {s['device']}. Load average (1 min, all processes on the machine) "
        f"at start {m['load_average_start']}, at end {s['load_average_end']}.",
        f"Command: `{s['command']}` ({'quick sizes: checks that the suite runs, figures not worth quoting' if s['quick'] else 'full sizes'}; "
        f"{s['repeats']} repetitions, medians of per-repetition paired ratios; started {s['started']}).", "",
        "## Summary", "", *_table(SUMMARY_COLUMNS, summary_rows(results)), "",
    ]
    for i, (name, bench) in enumerate(results["benchmarks"].items(), 1):
        lines += [f"## {i}. {name}", ""]
        if bench.get("error"):
            lines += ["```", bench["error"], "```", ""]
            continue
        for table in bench.get("tables_objects", []):
            lines += [f"**{table.title}**", "", *_table(table.columns, table.rows), ""]
        lines += [f"- {note}" for note in bench.get("notes", [])]
        lines.append("")
    lines += ["## Run time", "", *_table(["part", "wall seconds", "CPU seconds", "load average at end"],
                                         [[k, f"{v['seconds']:.1f}", f"{v['cpu_seconds']:.1f}", str(v.get("load_average_end", "-"))]
                                          for k, v in results["elapsed"].items()]), "",
              f"CPU seconds include the benchmarks' subprocesses. On a busy machine wall time stretches and CPU time "
              f"barely does: with {s['threads']} torch thread(s), one process at a time, CPU seconds ÷ {s['threads']} is "
              "about the wall time on an idle machine.", ""]
    return "\n".join(lines)


def to_json(results: dict) -> dict:
    """results without the in-memory Figure/Table objects (those are rendered into plain dicts)."""
    out = {k: v for k, v in results.items() if k != "benchmarks"}
    out["benchmarks"] = {}
    for name, bench in results["benchmarks"].items():
        clean = {k: v for k, v in bench.items() if not k.endswith("_objects")}
        clean["figures"] = [f.to_json() for f in bench.get("figures_objects", [])]
        clean["tables"] = [t.to_json() for t in bench.get("tables_objects", [])]
        out["benchmarks"][name] = clean
    return out


__all__ = ["Figure", "Table", "markdown", "to_json", "summary_rows", "SUMMARY_COLUMNS"]
