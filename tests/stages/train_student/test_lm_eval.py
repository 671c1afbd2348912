"""final/ is evaluated by lm-evaluation-harness as it stands: its Python API, the `hf` model, a local task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from .helpers import train, train_config

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e \".[eval]\")")

# Contexts from the tests' corpus (the standard library's source), each with the real next word and two others.
DOCS = [{"context": "def __init__(self,", "choices": ["name", "import", "return"], "label": 0},
        {"context": "for i in", "choices": ["range(n):", "class", "None"], "label": 0},
        {"context": "if __name__ ==", "choices": ["'__main__':", "lambda", "yield"], "label": 0},
        {"context": "    return", "choices": ["self", "def", "elif"], "label": 0}]
TASK = """task: sad_pipe_next_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) the way lm-eval splits a pair: encode both together, the context's tokens first."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))


def test_lm_eval_scores_the_exported_student_on_a_local_task(tmp_path, kd_cache):
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(train_config(tmp_path, kd_cache, train={"max_steps": 3}))
    final = tmp_path / "run" / "final"
    data = tmp_path / "next_word.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "next_word.yaml").write_text(TASK.format(data=data))

    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(final), "dtype": "float32", "device": "cpu"},
                                  tasks=["sad_pipe_next_word"], batch_size=2, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    acc = out["results"]["sad_pipe_next_word"]["acc,none"]

    model, tokenizer = AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    picks = []
    for sample, doc in zip(sorted(out["samples"]["sad_pipe_next_word"], key=lambda s: s["doc_id"]), DOCS):
        ours = [continuation_logprob(model, tokenizer, doc["context"], " " + choice) for choice in doc["choices"]]
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, rel=1e-4), doc["context"]  # lm-eval scored this very student
        picks.append(max(range(len(ours)), key=ours.__getitem__) == doc["label"])
    assert math.isclose(acc, sum(picks) / len(picks))
