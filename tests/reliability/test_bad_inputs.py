"""Every row of the README's "Bad inputs" table, run through the real CLI: one line on stderr that matches
the table's message exactly (placeholders in <angle brackets> stand for paths and numbers), the table's
exit code, no traceback. The table is read from README.md, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cli, save_llama, train_bpe, write_jsonl
from stages.train_student.helpers import LLAMA_STUDENT, train, train_config

from sad_pipe.pipeline.data import is_eval

from .conftest import cache_of, writer_config

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_rows() -> list[dict]:
    """The rows of README.md's "## Bad inputs" table: id, command, exit code, message."""
    text = README.read_text()
    start = text.index("\n## Bad inputs")
    section = text[start:text.index("\n## ", start + 1)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 5, line
        rows.append({"id": cells[0].strip("`"), "input": cells[1], "command": cells[2].strip("`"),
                     "exit": int(cells[3]), "message": cells[4].strip("`").strip()})
    return rows


def pattern(message: str) -> re.Pattern:
    """The table's message as a regex: literal text, each <placeholder> any non-empty text."""
    parts = re.split(r"<[a-z][a-z0-9 _-]*>", message)
    return re.compile(".+?".join(re.escape(p) for p in parts))


# -- the inputs, one function per table row -------------------------------------------------------------------

def teacher(ctx, **sections) -> list[str]:
    return ["cache-teacher", "--config", writer_config(ctx.tmp, ctx.assets, ctx.docs, **sections)]


def student(ctx, *extra, cache=None, **sections) -> list[str]:
    return ["train-student", "--config", train_config(ctx.tmp, cache or ctx.cache, **sections), *extra]


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def copy_cache(ctx) -> Path:
    return Path(shutil.copytree(ctx.cache, ctx.tmp / "cache-copy"))


def unfinished_run(ctx) -> Path:
    """A run directory with checkpoints and no result.json, as a stopped run leaves it."""
    run = ctx.tmp / "run"
    shutil.copytree(ctx.finished, run)
    (run / "result.json").unlink()
    return run


def replaced_teacher(ctx) -> list[str]:
    """A cache stopped after its first shards, then the teacher's weights replaced by another model of the
    same config, then the same command again."""
    teacher = ctx.tmp / "teacher"
    shutil.copytree(ctx.assets["llama"], teacher)
    args = ["cache-teacher", "--config", writer_config(ctx.tmp, ctx.assets, ctx.docs, teacher={"model": str(teacher)},
                                                       data={"max_documents": 3})]
    cli("-q", *args)
    (Path(cache_of(args[2])) / "manifest.json").unlink()  # as if stopped before its end
    save_llama(str(ctx.tmp / "other"), 512, seed=7)
    shutil.copy(ctx.tmp / "other" / "model.safetensors", teacher / "model.safetensors")
    return args


def replaced_student(ctx) -> list[str]:
    """A run from a pretrained student, stopped, the student's weights replaced, then resumed."""
    from transformers import AutoTokenizer

    student = save_llama(str(ctx.tmp / "student"), 512, seed=1)
    AutoTokenizer.from_pretrained(ctx.assets["tokenizer"]).save_pretrained(student)
    config = train_config(ctx.tmp, ctx.cache, student={"model": student}, train={"max_steps": 2, "save_steps": 1,
                                                                                  "eval_max_sequences": 4})
    train(config)
    (ctx.tmp / "run" / "result.json").unlink()
    save_llama(str(ctx.tmp / "other"), 512, seed=2)
    shutil.copy(ctx.tmp / "other" / "model.safetensors", Path(student) / "model.safetensors")
    return ["train-student", "--config", config]


def nan_teacher(ctx) -> str:
    path = save_llama(str(ctx.tmp / "nan-teacher"), 512)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(ctx.assets["llama"]).save_pretrained(path)
    return path


def foreign_student(ctx) -> str:
    path = save_llama(str(ctx.tmp / "student"), 512)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(train_bpe(str(ctx.tmp / "tok"), 400, ctx.assets["docs"][30:40])).save_pretrained(path)
    return path


def chat_teacher(ctx) -> str:
    """The tests' Llama teacher with an Instruct-style tokenizer (a chat template)."""
    from conftest import special_tokenizer

    path = ctx.tmp / "chat-teacher"
    shutil.copytree(ctx.assets["llama"], path)
    return special_tokenizer(str(path), ctx.assets["docs"][:30], bos=True, chat=True)


def chat_rows(ctx, rows: list) -> str:
    path = ctx.tmp / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return str(path)


def short_docs(ctx) -> str:
    return write_jsonl(str(ctx.tmp / "short.jsonl"), ["tiny document one", "tiny document two"])


def small_eval_split(ctx) -> str:
    long = next(d[:600] for d in ctx.assets["docs"] if not is_eval(d[:600], 0.5))
    short = next(t for t in (f"note {i}" for i in range(100)) if is_eval(t, 0.5))
    return write_jsonl(str(ctx.tmp / "docs.jsonl"), [long, short])


def config_file(ctx, text: str) -> list[str]:
    path = ctx.tmp / "config.json"
    path.write_text(text)
    return ["train-student", "--config", str(path)]


def damaged_shard(ctx) -> list[str]:
    cache = copy_cache(ctx)
    record = json.loads((cache / "commits" / "train-00001.json").read_text())
    with open(cache / record["dir"] / "hidden_2/c/0/0/0", "r+b") as f:
        f.truncate(10)
    return student(ctx, cache=str(cache))


def escaping_manifest(ctx) -> list[str]:
    cache = copy_cache(ctx)
    edit_json(cache / "manifest.json", lambda m: m["shards"]["train"].__setitem__(0, "../../etc/passwd"))
    return student(ctx, cache=str(cache))


def old_format(ctx) -> list[str]:
    cache = copy_cache(ctx)
    edit_json(cache / "manifest.json", lambda m: m.__setitem__("format_version", 0))
    return student(ctx, cache=str(cache))


def other_cache(ctx) -> list[str]:
    """The run's cache rebuilt from other inputs under the same path: its identity (cache_id) changed."""
    run = unfinished_run(ctx)
    cache = copy_cache(ctx)
    edit_json(cache / "manifest.json", lambda m: m["identity"]["dataset"].__setitem__("max_documents", 5))
    config = json.loads((run / "config.json").read_text())
    config["cache"]["path"], config["train"]["output"] = str(cache), str(run)
    return ["train-student", "--config", str(write_json(ctx.tmp / "resume.json", config))]


def topk_only_cache(ctx) -> str:
    """The reference cache holds every target form; this one only top-k (the default)."""
    config = writer_config(ctx.tmp / "topk-only", ctx.assets, ctx.docs, cache={"targets": ["topk"]})
    cli("-q", "cache-teacher", "--config", config)
    return cache_of(config)


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def resume_with(ctx, *overrides: str) -> list[str]:
    run = unfinished_run(ctx)
    return ["train-student", "--config", str(run / "config.json"), "--output", str(run),
            *[a for o in overrides for a in ("--set", o)]]


def malicious_checkpoint(ctx) -> list[str]:
    run = unfinished_run(ctx)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    (newest / "optimizer.pt").write_bytes(EVIL_PICKLE)
    return ["train-student", "--config", str(run / "config.json"), "--output", str(run)]


class _Evil:  # unpickling this would run `touch <marker>`; weights_only=True refuses it
    marker = "/tmp/sad-pipe-pwned"

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


EVIL_PICKLE = __import__("pickle").dumps(_Evil())

SCENARIOS = {
    "key-typo": lambda c: student(c, "--set", "train.learning_rat=0.001"),
    "wrong-type": lambda c: student(c, "--set", 'train.batch_size="8"'),
    "out-of-range": lambda c: student(c, "--set", "train.gradient_accumulation_steps=0"),
    "original-key": lambda c: student(c, "--set", "learning_rate=0.001"),
    "config-missing": lambda c: ["train-student", "--config", str(c.tmp / "nowhere.json")],
    "config-not-json": lambda c: config_file(c, '{"train": {"batch_size": 8,}}'),
    "set-without-value": lambda c: student(c, "--set", "train.batch_size"),
    "data-missing": lambda c: teacher(c, data={"path": str(c.tmp / "missing.jsonl")}),
    "teacher-missing": lambda c: teacher(c, teacher={"model": str(c.tmp / "no-teacher")}),
    "dataset-empty": lambda c: teacher(c, data={"path": write_jsonl(str(c.tmp / "empty.jsonl"), [])}),
    "dataset-tiny": lambda c: teacher(c, data={"path": short_docs(c)}),
    "eval-split-tiny": lambda c: teacher(c, data={"path": small_eval_split(c), "eval_fraction": 0.5}),
    "text-field": lambda c: teacher(c, data={"text_field": "body"}),
    "teacher-layers": lambda c: teacher(c, teacher={"layers": [1, 3]}),
    "top-k": lambda c: teacher(c, cache={"top_k": 513}),
    "nan-teacher": lambda c: teacher(c, teacher={"model": nan_teacher(c)}),
    "cache-is-file": lambda c: teacher(c, cache={"path": str(write_json(c.tmp / "file", {}))}),
    "cache-other-identity": lambda c: teacher(c, cache={"path": str(copy_cache(c)), "top_k": 8}),
    "tokenizer-mismatch": lambda c: student(c, student={"model": foreign_student(c)}),
    "student-vocab-short": lambda c: student(c, student={"config": {**LLAMA_STUDENT, "vocab_size": 400}}),
    "student-layers": lambda c: student(c, loss={"student_layers": [1, 5]}),
    "temperature-not-cached": lambda c: student(c, loss={"temperature": 3.0}),
    "kd-top-k": lambda c: student(c, loss={"kd_top_k": 32}),
    "kd-form-not-cached": lambda c: student(c, loss={"kd_form": "hybrid"}, cache=topk_only_cache(c)),
    "batch-too-big": lambda c: student(c, train={"batch_size": 1000}),
    "cache-missing": lambda c: student(c, cache=str(c.tmp / "nowhere")),
    "old-format": old_format,
    "damaged-shard": damaged_shard,
    "manifest-escapes": escaping_manifest,
    "resume-batch-size": lambda c: resume_with(c, "train.batch_size=8"),
    "resume-other-cache": other_cache,
    "finished-run": lambda c: ["train-student", "--config", str(c.finished / "config.json")],
    "malicious-checkpoint": malicious_checkpoint,
    "replaced-teacher": replaced_teacher,
    "replaced-student": replaced_student,
    "output-is-file": lambda c: student(c, train={"output": str(write_json(c.tmp / "file", {}))}),
    "messages-not-a-list": lambda c: teacher(c, teacher={"model": chat_teacher(c)}, data={
        "format": "messages", "path": chat_rows(c, ["a string, not messages"])}),
    "no-chat-template": lambda c: teacher(c, data={"format": "messages", "path": chat_rows(c, [[{"role": "user", "content": "hi"}]])}),
    "nothing-to-train": lambda c: teacher(c, teacher={"model": chat_teacher(c)}, data={
        "format": "messages", "path": chat_rows(c, [[{"role": "user", "content": "a question nobody answers"}]])}),
}


@pytest.fixture(scope="module")
def finished_run(reference, tmp_path_factory) -> Path:
    """Two optimizer steps, a checkpoint after each."""
    tmp = tmp_path_factory.mktemp("finished")
    train(train_config(tmp, reference, train={"max_steps": 2, "save_steps": 1, "eval_max_sequences": 4}))
    return tmp / "run"


def test_the_readme_table_and_the_scenarios_are_the_same_rows():
    ids = [row["id"] for row in readme_rows()]
    assert len(ids) == len(set(ids)) >= 15
    assert sorted(ids) == sorted(SCENARIOS)


@pytest.mark.parametrize("row", readme_rows(), ids=lambda row: row["id"])
def test_a_bad_input_gives_the_readme_message(row, tmp_path, assets, rel_docs, reference, finished_run):
    ctx = SimpleNamespace(tmp=tmp_path, assets=assets, docs=rel_docs, cache=reference, finished=finished_run)
    args = SCENARIOS[row["id"]](ctx)
    assert args[0] == row["command"]
    result = cli("-q", *args, expect=row["exit"])
    lines = result.output.rstrip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert lines[-1] == errors[0]  # nothing after it
    assert pattern(row["message"]).fullmatch(errors[0].removeprefix("error: ")), (errors[0], row["message"])
    if row["id"] == "malicious-checkpoint":
        assert not Path(_Evil.marker).exists()
