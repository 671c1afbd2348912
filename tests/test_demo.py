"""`make all` in miniature: the real demo.mk, the real config files (shrunk), the real CLI.

The configs are copied with small sizes (tiny models, a few steps, a slice of the corpus) but the
same keys and paths, and the chain runs through make exactly as `make all` does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64}
TINY_TRAIN = {"batch_size": 2, "max_steps": 4, "warmup_steps": 1, "eval_steps": 2, "save_steps": 0, "eval_max_sequences": 8}


def _shrunk_configs(dest: Path) -> None:
    src = ROOT / "configs" / "demo"
    (dest / "methods").mkdir(parents=True)
    for method in (src / "methods").glob("*.json"):
        (dest / "methods" / method.name).write_text(method.read_text())
    edits = {
        "tokens.json": {"data": {"max_length": 64, "eval_fraction": 0.2}},
        "teacher.json": {"student": {"config": TINY_MODEL}, "train": {**TINY_TRAIN, "max_steps": 3, "eval_steps": 0}},
        "cache.json": {"teacher": {"layers": [1, 2]}, "data": {"max_length": 64, "eval_fraction": 0.2, "max_documents": 8},
                       "cache": {"top_k": 32, "sequences_per_shard": 32, "sequences_per_chunk": 8}},
        "student-small.json": {"student": {"config": {**TINY_MODEL, "hidden_size": 16, "intermediate_size": 32}}, "train": TINY_TRAIN},
        "student-medium.json": {"student": {"config": TINY_MODEL}, "train": TINY_TRAIN},
    }
    for name, edit in edits.items():
        cfg = json.loads((src / name).read_text())
        for section, values in edit.items():
            for key, value in values.items():
                if isinstance(value, dict):
                    cfg[section][key].update(value)
                else:
                    cfg[section][key] = value
        (dest / name).write_text(json.dumps(cfg))


def _make(workdir: Path) -> subprocess.CompletedProcess:
    cmd = ["make", "-f", str(ROOT / "demo.mk"), "all", f"SAD={sys.executable} -m sad_pipe.cli", "STAMP=",
           "CONFIGS=configs/demo", "CORPUS_MB=0.25", "VOCAB=400", "MEDIUM_METHODS=ce hybrid"]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def test_make_all_in_miniature(tmp_path):
    _shrunk_configs(tmp_path / "configs" / "demo")
    first = _make(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    demo = tmp_path / "runs" / "demo"
    report = (demo / "report.md").read_text()
    cache_id = json.loads((demo / "cache" / "manifest.json").read_text())["summary"]["cache_id"]
    runs = sorted(demo.glob("students/*/*/result.json"))
    assert {(p.parent.parent.name, p.parent.name) for p in runs} == {
        *(("small", m) for m in ("ce", "full", "subset", "hybrid", "curriculum")), ("medium", "ce"), ("medium", "hybrid")}
    for path in runs:  # every student came from the one cache, and its final model loads
        assert json.loads(path.read_text())["cache_id"] == cache_id
        assert (path.parent / "final" / "config.json").exists()
    assert f"`{cache_id}` (the same one)" in report
    for heading in ("## Teacher", "## Cache", "### small", "### medium", "## Goals, as measured"):
        assert heading in report
    assert (demo / "plots" / "small-ce.png").stat().st_size > 0
    assert "[sad-pipe train-student:" in first.stderr  # a timed line per stage

    second = _make(tmp_path)  # everything is up to date: only the report is printed
    assert second.returncode == 0
    assert "sad_pipe.cli" not in second.stdout and "## Students" in second.stdout


def test_compare_reports_paired_differences_over_seeds(tmp_path):
    from sad_pipe.demo.report import build_comparison

    ce = {"seed-0": {"ce": 6.0, "full": 5.4, "subset": 5.3, "tail": 5.41},
          "seed-1": {"ce": 6.2, "full": 5.7, "subset": 5.5, "tail": 5.8}}
    for seed, methods in ce.items():
        for method, value in methods.items():
            (tmp_path / seed / method).mkdir(parents=True)
            (tmp_path / seed / method / "result.json").write_text(json.dumps({"eval/ce": value}))
    text = build_comparison(tmp_path)
    assert (tmp_path / "compare.md").read_text() == text
    # subset vs ce: -11.67% and -11.29% -> mean -11.48, sd 0.27; vs full: -1.85% and -3.51%
    paired = [line for line in text.splitlines() if line.startswith("| subset |")][-1]
    assert "-11.48% +- 0.27 [-11.67, -11.29] (n=2)" in paired
    assert "-2.68% +- 1.17 [-3.51, -1.85] (n=2)" in paired and paired.endswith("| yes |")
    tail = [line for line in text.splitlines() if line.startswith("| tail |")][-1]
    assert tail.endswith("| no (worst +1.75%) |")  # within 1% on average, not on every seed


def test_diagnose_compares_each_cached_forms_gradient_with_online_full_kd(tmp_path, kd_cache, assets):
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import cli
    from stages.train_student.helpers import train_config

    from sad_pipe.storage.reader import CacheReader

    config = train_config(tmp_path, kd_cache, loss={"temperature": 1.0},
                          curriculum={"use_curriculum": False, "weights": {"kd": 0.7, "ce": 0.3, "feature": 0.0, "relation": 0.0}})
    out = tmp_path / "diagnose"
    result = cli("-q", "demo", "diagnose", "--config", config, "--teacher", assets["llama"], "--output", str(out),
                 "--follow", "hybrid", "--steps", "3")
    rows = [json.loads(line) for line in (out / "diagnose.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:  # kd_cache holds top-k and hybrid draws: those forms are measured, sampled is not
        assert {k for k in row if k.startswith("cosine/")} == {"cosine/tail", "cosine/subset", "cosine/hybrid"}
        for form in ("tail", "subset", "hybrid"):
            assert -1.0 <= row[f"cosine/{form}"]["all"] <= 1.0 + 1e-6
        assert 0.0 < row["student_tail_mass"] < 1.0
    assert CacheReader(kd_cache).scheme.k == 16 and all(0.0 < r["teacher_tail_mass"] < 1.0 for r in rows)  # outside the top-16
    assert "| 1-3 |" in (out / "diagnose.md").read_text() and "| 1-3 |" in result.output
