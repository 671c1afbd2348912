"""`sad-pipe bench`: the quick suite runs end to end and writes well-formed results. No timing assertions:
the figures depend on the machine; only their presence and the files' structure are checked."""

from __future__ import annotations

import json

import pytest
from conftest import cli

from sad_pipe.bench import BENCHMARKS
from sad_pipe.bench.measure import Figure, interleaved, paired, spread
from sad_pipe.bench.report import SUMMARY_COLUMNS


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    teacher_cache = tmp_path_factory.mktemp("teacher-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SAD_PIPE_BENCH_WORK", raising=False)  # a temporary work directory, removed afterwards
        mp.setenv("SAD_PIPE_TEACHER_CACHE", str(teacher_cache))  # never the home directory, whatever happens
        result = cli("bench", "--quick", "--repeats", "1", "--output", str(out))
    assert not any(teacher_cache.iterdir()), "--quick wrote its tiny teachers into the shared teacher cache"
    return out, result


def test_quick_suite_writes_results_json(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    machine = results["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch"]
    assert results["settings"]["quick"] is True and results["settings"]["repeats"] == 1
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    for name, bench in results["benchmarks"].items():
        assert "error" not in bench, f"{name}: {bench.get('error')}"
        assert bench["figures"], f"{name} reported no figure"
        for f in bench["figures"]:
            assert len(f["values"]) >= 1 and f["min"] <= f["median"] <= f["max"], f
            assert f["unit"] and f["numerator"]
            assert f["met"] in (True, False, None)
        assert bench["tables"] and all(len(r) == len(t["columns"]) for t in bench["tables"] for r in t["rows"])
    assert set(BENCHMARKS) | {"total"} <= set(results["elapsed"])
    assert not (out / "work").exists(), "the temporary work directory was left behind"


def test_kd_loss_benchmark_compares_equal_results(quick_run):
    """The memory figure is only worth something if both versions computed the same loss and gradients."""
    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())["benchmarks"]["kd-loss"]["data"]
    assert set(data["max_abs_difference"]) == {"ce", "kd", "grad_hidden", "grad_weight"}
    for name, diff in data["max_abs_difference"].items():
        assert diff <= 1e-4 * max(data["max_abs_value"][name], 1e-6), name


def test_storage_figures_come_from_profiled_teachers_on_every_index_range(quick_run):
    """Each codec row names the teacher it came from and its profile; ids are also spread over 32,000 and Qwen2.5's 151,936."""
    from sad_pipe.bench.storage import SIZES, TARGET_VOCAB, WIDE_VOCAB

    out, _ = quick_run
    bench = json.loads((out / "results.json").read_text())["benchmarks"]["storage"]
    recipes = SIZES["quick"]["teachers"]
    assert WIDE_VOCAB == 151936 and set(bench["data"]["teachers"]) == {str(r.vocab) for r in recipes}
    for t in bench["data"]["teachers"].values():
        masses = list(t["profile"]["mass_T1"].values())
        assert masses == sorted(masses) and all(0 <= m <= 1 for m in masses)
    ranges = {(row["range"], row["vocab"]) for row in bench["data"]["topk"]}
    spread_ranges = {(f"V={r.vocab} ids -> [0, {wide:,})", wide) for r in recipes for wide in (TARGET_VOCAB, WIDE_VOCAB)}
    assert ranges == {(f"V={r.vocab}", r.vocab) for r in recipes} | spread_ranges
    for row in bench["data"]["topk"]:
        assert row["teacher_profile"] == bench["data"]["teachers"][str(row["teacher_vocab"])]["profile"]
    sized = [f["name"] for f in bench["figures"] if "bytes/token" in f["name"] and "top-k" in f["name"]]
    assert len(sized) == 2 * 3 * len(recipes)  # default and fp16, own range and two spread ones, per teacher
    assert all("top-16/64/256 mass" in name and "nats" in name for name in sized)


def test_hidden_benchmark_measures_every_mode_from_written_bytes(quick_run):
    """Each storage mode of the hidden states has its bytes and its reconstruction; more rank, less error."""
    out, _ = quick_run
    rows = json.loads((out / "results.json").read_text())["benchmarks"]["hidden"]["data"]["hidden_modes"]
    for layer in {r["layer"] for r in rows}:
        mine = {r["mode"]: r for r in rows if r["layer"] == layer}
        assert mine["bf16"]["ratio_vs_bf16"] == 1.0 and mine["bf16"]["relative_error"] < 0.01
        assert mine["int8"]["bytes_per_token"] < mine["bf16"]["bytes_per_token"]
        low = [mine[f"rank{r}-bf16"] for r in (4, 8)]
        assert low[0]["relative_error"] > low[1]["relative_error"] and low[0]["cosine"] < low[1]["cosine"]
        assert low[0]["variance_explained"] < low[1]["variance_explained"] < 1
        assert mine["bf16 every:4"]["bytes_per_token"] < 0.5 * mine["bf16"]["bytes_per_token"]


def test_quick_suite_writes_markdown_table(quick_run):
    out, result = quick_run
    text = (out / "results.md").read_text()
    lines = text.splitlines()
    assert "## Summary" in result.output and lines[2] in result.output  # the command prints what it wrote
    assert "AMD" in text or "Intel" in text or "cores" in text  # the machine is described
    start = lines.index("## Summary") + 2
    assert _cells(lines[start]) == SUMMARY_COLUMNS
    assert set(lines[start + 1].strip("|").split("|")) == {"---"}
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    figures = sum(len(b["figures"]) for b in json.loads((out / "results.json").read_text())["benchmarks"].values())
    assert len(rows) == figures
    assert all(len(r) == len(SUMMARY_COLUMNS) for r in rows)
    assert {r[0] for r in rows} == set(BENCHMARKS)
    for i, name in enumerate(BENCHMARKS, 1):
        assert f"## {i}. {name}" in lines
    assert "## Run time" in lines


def test_unknown_benchmark_is_a_usage_error(tmp_path):
    result = cli("bench", "--only", "nope", "--output", str(tmp_path / "out"), expect=2)
    assert "--only nope: unknown benchmark" in result.output


def test_interleaved_repetitions_alternate_order_and_pair_ratios():
    calls = []
    runs = interleaved(3, {"a": lambda: calls.append("a") or 2.0, "b": lambda: calls.append("b") or 4.0})
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert paired(runs["a"], runs["b"]) == [0.5, 0.5, 0.5]
    f = Figure("x", [1.0, 3.0, 2.0], "x", "a", "b", target=(">=", 1.5))
    assert f.median == 2.0 and f.met is True
    assert spread([1.0, 3.0, 2.0], "{:.1f}") == "2.0 (1.0-3.0)"


def test_gpu_check_runs_its_benchmarks_on_a_cpu_into_gpu_results(tmp_path, monkeypatch):
    """`make gpu-check` is `sad-pipe bench --gpu-check`; --device cpu --quick tries it without a GPU."""
    from sad_pipe.bench import GPU_CHECK

    monkeypatch.delenv("SAD_PIPE_BENCH_WORK", raising=False)
    monkeypatch.setenv("SAD_PIPE_TEACHER_CACHE", str(tmp_path / "teacher-cache"))
    out = tmp_path / "out"
    cli("bench", "--gpu-check", "--device", "cpu", "--quick", "--output", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["gpu-results.json", "gpu-results.md"]
    results = json.loads((out / "gpu-results.json").read_text())
    assert list(results["benchmarks"]) == GPU_CHECK == ["cache-teacher", "online-kd", "precision"]
    assert results["settings"]["command"].startswith(f"sad-pipe bench --output {out} --gpu-check --device cpu")
    assert all("error" not in b and b["figures"] for b in results["benchmarks"].values())
    names = [f["name"] for f in results["benchmarks"]["precision"]["figures"]]
    assert "train-student fp16 ÷ fp32: tokens/s" in names and "train-student bf16 ÷ fp32: tokens/s" in names
    assert "train-student fp16: steps skipped for overflowing gradients" in names
    assert "## 3. precision" in (out / "gpu-results.md").read_text()
