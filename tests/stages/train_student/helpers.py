"""Helpers for the train-student tests: write a train config, run the CLI, read what a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli

# A tiny fresh student (hidden 32, 2 layers), Llama-style (no dropout).
LLAMA_STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
# GPT-2 has dropout: a resume that restores the wrong RNG state shows up in its weights.
GPT2_STUDENT = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}


def train_config(tmp_path: Path, cache_path: str, name: str = "run", **sections) -> str:
    """A train-student config file: a tiny student, short run. `sections` update the defaults key by key,
    except `student`, which replaces the default student whole (config and model exclude each other)."""
    cfg = {
        "cache": {"path": cache_path},
        "student": {"config": LLAMA_STUDENT},
        "train": {"output": str(tmp_path / name), "batch_size": 4, "max_steps": 4, "warmup_steps": 1,
                  "learning_rate": 3e-3, "eval_max_sequences": 4, "seed": 0},
        "loss": {"kd_form": "tail", "temperature": 1.0},
    }
    cfg["student"] = sections.pop("student", cfg["student"])
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def train(config: str, *extra: str, expect: int | None = 0):
    return cli("-q", "train-student", "--config", config, *extra, expect=expect)


def metrics(run: str | Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def error_line(result) -> str:
    """The CLI's one-line error (exactly one line starts with "error:")."""
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]
