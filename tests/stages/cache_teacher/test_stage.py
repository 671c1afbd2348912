"""Stage one through the real CLI: the cache holds what a direct forward of the teacher gives, resumes to
the same bytes after an exception, a SIGKILL or Ctrl-C, and refuses bad input with one line and no files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli, save_llama, word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from sad_pipe.pipeline.config import DataConfig
from sad_pipe.pipeline.data import PackedDocuments, is_eval
from sad_pipe.stages.cache_teacher import runner
from sad_pipe.storage.codecs import decode_hidden, decode_topk, torch_view
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import read_commits
from sad_pipe.storage.reader import CacheReader

from .conftest import BATCH, EVAL_FRACTION, MAX_LENGTH, PER_SHARD



# -- inputs and helpers -------------------------------------------------------------------------------

def write_config(root: Path, model: str | None, docs: str, **sections) -> str:
    """A config under `root` (cache in root/cache) for teacher `model` and dataset `docs`; `sections` update keys."""
    cfg = {
        "teacher": {"model": model, "batch_size": BATCH, "layers": [1, 2], "device": "cpu"},
        "data": {"path": docs, "max_length": MAX_LENGTH, "eval_fraction": EVAL_FRACTION},
        "cache": {"path": str(root / "cache"), "top_k": 16, "temperatures": [1.0, 2.0],
                  "sequences_per_shard": PER_SHARD, "sequences_per_chunk": 8},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    return str(root / "config.json")


def cache_path(config: str) -> str:
    return json.loads(Path(config).read_text())["cache"]["path"]


def run(config: str, *args: str, expect: int = 0):
    return cli("-q", "cache-teacher", "--config", config, *args, expect=expect)


def snapshot(root: str) -> dict[str, tuple[int, int]]:
    """Every file below `root` with its size and mtime: equal snapshots mean nothing was written."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def read_all(url: str, groups: set[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Every array of every split (of `groups`, by default all the cache holds), read through the public reader."""
    r = CacheReader(url)
    groups = r.groups if groups is None else groups
    out = {}
    for split in r.plan.splits:
        parts = [r.read(split, a, min(a + r.shard_rows, r.sequences(split)), groups)
                 for a in range(0, r.sequences(split), r.shard_rows)]
        out[split] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return out


def assert_same_cache(a: str, b: str) -> None:
    """Same arrays bit for bit, same identity and shard table, same per-sequence index."""
    arrays_a, arrays_b = read_all(a), read_all(b)
    assert arrays_a.keys() == arrays_b.keys()
    for split in arrays_a:
        assert arrays_a[split].keys() == arrays_b[split].keys()
        for name in arrays_a[split]:
            np.testing.assert_array_equal(arrays_a[split][name], arrays_b[split][name], err_msg=f"{split}/{name}")
    ma, mb = (CacheReader(u).manifest for u in (a, b))
    assert ma["identity"] == mb["identity"] and ma["summary"]["cache_id"] == mb["summary"]["cache_id"]
    assert ma["splits"] == mb["splits"] and ma["arrays"] == mb["arrays"]
    for split in ma["splits"]:
        ia, ib = (pq.read_table(Path(u) / "index" / f"{split}.parquet").drop(["shard_dir"]) for u in (a, b))
        assert ia.equals(ib)


def assert_no_leftovers(url: str) -> None:
    """No temporary files, and every shard directory is the one its commit names."""
    cache = CacheFS(url)
    assert cache.listdir("_tmp") == []
    named = {r["dir"] for r in read_commits(cache).values()}
    present = {f"shards/{s}/{d}" for s in cache.listdir("shards") for d in cache.listdir(f"shards/{s}")}
    assert present == named


def committed(url: str) -> set[tuple[str, int]]:
    return set(read_commits(CacheFS(url)))


@pytest.fixture(scope="module")
def reference(docs_path, assets, tmp_path_factory) -> str:
    """The uninterrupted run every resumed cache must equal (llama teacher, uint8 values)."""
    config = write_config(tmp_path_factory.mktemp("reference"), assets["llama"], docs_path)
    run(config)
    return cache_path(config)


# -- the cache equals a direct forward of the teacher ----------------------------------------------------

def assert_matches_teacher(url: str, model_path: str, layers: list[int]) -> None:
    """Top-k ids exactly, values within the encoding's bound, lse at each T, target log-prob and hidden states,
    against the teacher run directly (same batches and position ids, so the same float operations) with
    output_hidden_states, at every trained position; the untrained ones hold zeros."""
    r = CacheReader(url)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    temps, k, values = r.temperatures, r.scheme.k, r.scheme.values
    for split, arrays in read_all(url).items():
        mask = arrays["loss_mask"]
        assert mask.mean() > 0.8 and not mask.all(), split  # documents end inside these sequences
        for s in range(0, len(arrays["input_ids"]), BATCH):
            ids = torch.from_numpy(arrays["input_ids"][s:s + BATCH].astype(np.int64))
            positions = torch.from_numpy(arrays["position_ids"][s:s + BATCH].astype(np.int64))
            with torch.inference_mode():
                out = model(input_ids=ids, position_ids=positions, output_hidden_states=True, use_cache=False)
            trained = torch.from_numpy(arrays["loss_mask"][s:s + BATCH]).bool()
            all_got = {name: torch_view(a[s:s + BATCH]) for name, a in arrays.items()}
            for name in ("topk_ids", "topk_values", "topk_max", "lse", "target_logprob"):
                assert (all_got[name][~trained] == 0).all(), name
            for layer in layers:
                h = decode_hidden(all_got[f"hidden_{layer}"], None, "bf16")
                torch.testing.assert_close(h, out.hidden_states[layer], rtol=2.0**-8, atol=1e-6)
            assert {n for n in all_got if n.startswith("hidden_")} == {f"hidden_{layer}" for layer in layers}
            logits_all = out.logits.float()
            next_ids = torch.cat([ids[:, 1:], ids[:, :1]], 1)
            has_next = (torch.arange(ids.shape[1]) < ids.shape[1] - 1).expand_as(ids)[trained]
            logits, ids = logits_all[trained], next_ids[trained]
            got = {name: a[trained] for name, a in all_got.items() if not name.startswith("hidden_")}

            top = decode_topk(got, r.scheme)
            assert torch.equal(top.ids, logits.topk(k, dim=-1).indices.sort(dim=-1).values), f"{split} batch {s}"
            exact = logits.gather(-1, top.ids)
            if values == "uint8":  # q = round((max - logit) / step): off by at most half a step
                bound = got["topk_step"].float().unsqueeze(-1) / 2
            else:  # (max - logit) rounded to fp16: half an ulp of the gap
                bound = (logits.amax(-1, keepdim=True) - exact).abs() * 2.0**-11
            assert ((top.logits - exact).abs() <= bound + 1e-5).all()
            torch.testing.assert_close(got["topk_max"], logits.amax(-1), rtol=1e-6, atol=1e-6)

            for j, t in enumerate(temps):
                torch.testing.assert_close(got["lse"][..., j], torch.logsumexp(logits / t, -1), rtol=1e-6, atol=1e-5)
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
            torch.testing.assert_close(got["target_logprob"][has_next], logp[has_next], rtol=1e-6, atol=1e-5)
            assert (got["target_logprob"][~has_next] == 0).all()  # no next token inside the sequence


def test_a_document_gets_the_teacher_outputs_it_gets_alone_whatever_it_is_packed_with(assets, tmp_path):
    """Packing documents: every document that lies whole inside a sequence after another one has the top-k
    and logsumexp of the teacher run on that document alone (fp32 tolerance)."""
    docs = tmp_path / "short.jsonl"
    docs.write_text("".join(json.dumps({"text": d[:90]}) + "\n" for d in assets["docs"][:24]))
    config = write_config(tmp_path, assets["llama"], str(docs), data={"eval_fraction": 0.0, "max_length": 64})
    run(config)
    model = AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()
    r = CacheReader(cache_path(config))
    arrays = read_all(cache_path(config))["train"]
    checked = 0
    for row in range(len(arrays["input_ids"])):
        pos = arrays["position_ids"][row].astype(np.int64)
        starts = [t for t in range(1, len(pos)) if pos[t] == 0]  # documents that follow another in the sequence
        for a, b in zip(starts, starts[1:]):
            ids = torch.from_numpy(arrays["input_ids"][row, a:b].astype(np.int64))[None]
            with torch.inference_mode():
                alone = model(input_ids=ids, use_cache=False).logits.float()[0]
            got = decode_topk({k: torch_view(arrays[k][row:row + 1, a:b - 1]) for k in
                               ("topk_ids", "topk_values", "topk_max", "topk_step")}, r.scheme)
            want = alone[:-1].topk(r.scheme.k, dim=-1).indices.sort(dim=-1).values
            assert torch.equal(got.ids[0], want), (row, a, b)
            lse = torch_view(arrays["lse"][row, a:b - 1])
            for j, t in enumerate(r.temperatures):
                torch.testing.assert_close(lse[:, j], torch.logsumexp(alone[:-1] / t, -1), rtol=1e-5, atol=1e-5)
            assert arrays["loss_mask"][row, b - 1] == 0  # its last token never predicts the next document
            checked += 1
    assert checked >= 3


def test_llama_cache_matches_a_direct_forward(reference, assets):
    assert_matches_teacher(reference, assets["llama"], [1, 2])


@pytest.mark.parametrize("teacher, values, layers, fused", [
    ("gpt2", "uint8", [0, 2], True),
    ("llama", "fp16", [2], True),
    ("llama", "uint8", [1], False),  # the path for heads that are more than one Linear: the model's own logits
])
def test_other_teachers_and_encodings_match_a_direct_forward(tmp_path, docs_path, assets, monkeypatch, teacher, values,
                                                             layers, fused):
    if not fused:
        monkeypatch.setattr(runner, "has_plain_head", lambda model, vocab: False)
    config = write_config(tmp_path, assets[teacher], docs_path, teacher={"layers": layers}, cache={"values": values})
    run(config)
    assert_matches_teacher(cache_path(config), assets[teacher], layers)


def test_the_head_is_fused_only_when_it_reproduces_the_model_logits(assets):
    model = AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()
    assert runner.has_plain_head(model, 512)
    forward = model.forward

    def soft_capped(*args, **kwargs):  # like Gemma 2's final_logit_softcapping, applied after the head
        out = forward(*args, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out

    model.forward = soft_capped
    assert not runner.has_plain_head(model, 512)


def test_a_vocabulary_above_65535_is_stored_as_uint32(tmp_path):
    vocab = 70_000
    model = save_llama(str(tmp_path / "teacher"), vocab, hidden=16, heads=2, kv_heads=1)
    AutoTokenizer.from_pretrained(word_tokenizer(str(tmp_path / "tok"), vocab)).save_pretrained(model)
    rng = np.random.default_rng(0)
    words = rng.integers(vocab - 4000, vocab - 2, size=(6, 60))  # plenty of ids above 65535
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in doc)}) + "\n" for doc in words))
    config = write_config(tmp_path, model, str(tmp_path / "docs.jsonl"), data={"eval_fraction": 0.0},
                          teacher={"layers": [1]})
    run(config)
    arrays = read_all(cache_path(config))["train"]
    assert arrays["input_ids"].dtype == np.uint32 and arrays["topk_ids"].dtype == np.uint32
    assert arrays["input_ids"].max() > 65535 and arrays["topk_ids"].astype(np.int64).cumsum(-1).max() > 65535
    assert_matches_teacher(cache_path(config), model, [1])


# -- tokens ------------------------------------------------------------------------------------------------

def test_cached_tokens_are_the_packed_documents_and_the_same_on_every_run(reference, docs_path, assets, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    expected = {"train": [], "eval": []}
    for seq in PackedDocuments(DataConfig(path=docs_path, max_length=MAX_LENGTH, eval_fraction=EVAL_FRACTION), tokenizer):
        expected[seq.split].append((seq.input_ids, seq.doc_span))
    arrays = read_all(reference)
    for split, rows in expected.items():
        assert len(rows) >= 2
        np.testing.assert_array_equal(arrays[split]["input_ids"], np.stack([seq for seq, _ in rows]))
        index = pq.read_table(Path(reference) / "index" / f"{split}.parquet").to_pydict()
        assert index["sequence"] == list(range(len(rows)))
        assert list(zip(index["doc_first"], index["doc_last"])) == [span for _, span in rows]
    # A second, independent run (tokens only, another directory) packs exactly the same sequences.
    config = write_config(tmp_path, None, docs_path, data={"tokenizer": assets["llama"]})
    run(config)
    again = read_all(cache_path(config), {"input_ids"})
    for split in expected:
        np.testing.assert_array_equal(again[split]["input_ids"], arrays[split]["input_ids"])


def test_rerunning_a_complete_cache_does_nothing(reference, assets, docs_path, tmp_path):
    url = str(tmp_path / "cache")
    shutil.copytree(reference, url)
    config = write_config(tmp_path, assets["llama"], docs_path)
    before = snapshot(url)
    summary = json.loads(run(config, "--json").stdout)
    assert summary["already_complete"] is True and snapshot(url) == before


# -- interruptions resume to the same cache ---------------------------------------------------------------

def failing_on_call(monkeypatch, n: int, error: BaseException) -> None:
    """The teacher raises `error` on its n-th batch (batches 4i+1 to 4i+4 make shard i)."""
    original, calls = runner.TeacherRunner.__call__, []

    def call(self, input_ids, *rest, **kw):
        calls.append(1)
        if len(calls) == n:
            raise error
        return original(self, input_ids, *rest, **kw)

    monkeypatch.setattr(runner.TeacherRunner, "__call__", call)


def test_an_exception_mid_run_resumes_to_the_uninterrupted_cache(reference, assets, docs_path, tmp_path, monkeypatch):
    config = write_config(tmp_path, assets["llama"], docs_path)
    failing_on_call(monkeypatch, 10, RuntimeError("injected"))  # the second batch of train shard 2
    with pytest.raises(RuntimeError, match="injected"):
        run(config)
    url = cache_path(config)
    assert committed(url) == {("train", 0), ("train", 1)}
    assert not os.path.exists(os.path.join(url, "manifest.json"))
    assert_no_leftovers(url)  # the half-written shard was discarded
    monkeypatch.undo()
    run(config)
    assert_same_cache(url, reference)
    assert_no_leftovers(url)


def test_ctrl_c_keeps_committed_shards_discards_the_current_one_and_resumes(reference, assets, docs_path, tmp_path,
                                                                           monkeypatch):
    config = write_config(tmp_path, assets["llama"], docs_path)
    failing_on_call(monkeypatch, 7, KeyboardInterrupt())  # the third batch of train shard 1
    result = run(config, expect=130)
    assert result.stderr.strip().splitlines()[-1].startswith("error: interrupted; committed work is kept")
    url = cache_path(config)
    assert committed(url) == {("train", 0)}
    assert_no_leftovers(url)
    monkeypatch.undo()
    run(config)
    assert_same_cache(url, reference)


def test_a_sigkilled_run_resumes_to_the_uninterrupted_cache(reference, assets, docs_path, tmp_path):
    config = write_config(tmp_path, assets["llama"], docs_path)
    url = cache_path(config)
    commits = Path(url) / "commits"
    log = tmp_path / "child.log"
    with open(log, "wb") as out:
        child = subprocess.Popen([sys.executable, "-m", "sad_pipe.cli", "-q", "cache-teacher", "--config", config],
                                 stdout=out, stderr=out, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while child.poll() is None:  # kill it as soon as two shards are committed
            if commits.is_dir() and len([n for n in os.listdir(commits) if n.endswith(".json")]) >= 2:
                child.send_signal(signal.SIGKILL)
                break
            try:
                child.wait(timeout=0.005)
            except subprocess.TimeoutExpired:
                pass
        child.wait(timeout=120)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    total = sum(len(s["shards"]) for s in CacheReader(reference).plan.splits.values())
    assert 2 <= len(committed(url)) < total and not os.path.exists(os.path.join(url, "manifest.json"))
    run(config)
    assert_same_cache(url, reference)
    assert_no_leftovers(url)


# -- bad input: one line on stderr, a non-zero exit, nothing written ---------------------------------------

def assert_refused(config: str, code: int, pattern: str) -> str:
    result = run(config, expect=code)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def test_a_missing_teacher_is_refused(tmp_path, docs_path):
    config = write_config(tmp_path, str(tmp_path / "no-teacher"), docs_path)
    assert_refused(config, 1, f"teacher.model '{re.escape(str(tmp_path / 'no-teacher'))}': no such directory")
    assert not os.path.exists(cache_path(config))


@pytest.mark.parametrize("case, code, pattern", [
    ("dataset not found", 1, r"data.path .*missing.jsonl: no such file or directory"),
    ("hub dataset not found", 1, r"data.path sad-pipe-tests/no-such-dataset: cannot load dataset"),
    ("text field absent", 1, r"data.text_field 'body' is not a column of .*docs.jsonl \(columns: text\)"),
    ("empty dataset", 1, r"data.path .*empty.jsonl: empty \(no documents\)"),
    ("shorter than one sequence", 1, r"data.path .*short.jsonl: no training sequence of 32 tokens \(2 documents, \d+ tokens\)"),
    ("eval split too small", 1, r"data.eval_fraction 0.5: the eval split has \d+ tokens, less than one sequence of 32"),
    ("layer out of range", 2, r"teacher.layers \[3\]: out of range; this teacher has hidden states 0..2"),
    ("top_k above vocab", 2, r"cache.top_k 513: larger than the teacher's vocabulary \(512\)"),
    ("longer than the context", 2, r"data.max_length 256: longer than the teacher's context \(128\)"),
])
def test_bad_input_is_refused_with_one_line_and_nothing_written(tmp_path, assets, docs_path, case, code, pattern):
    teacher, data, sections = assets["llama"], docs_path, {}
    if case == "dataset not found":
        data = str(tmp_path / "missing.jsonl")
    elif case == "hub dataset not found":
        data = "sad-pipe-tests/no-such-dataset"
    elif case == "text field absent":
        sections = {"data": {"text_field": "body"}}
    elif case == "empty dataset":
        data = str(tmp_path / "empty.jsonl")
        Path(data).write_text("")
    elif case == "shorter than one sequence":
        data = str(tmp_path / "short.jsonl")
        Path(data).write_text("".join(json.dumps({"text": f"tiny document {i}"}) + "\n" for i in range(2)))
    elif case == "eval split too small":  # a long train document, a short held-out one
        long = next(d[:400] for d in assets["docs"] if not is_eval(d[:400], 0.5))
        short = next(t for t in (f"note {i}" for i in range(100)) if is_eval(t, 0.5))
        data = str(tmp_path / "docs.jsonl")
        Path(data).write_text(json.dumps({"text": long}) + "\n" + json.dumps({"text": short}) + "\n")
        sections = {"data": {"eval_fraction": 0.5}}
    elif case == "layer out of range":
        sections = {"teacher": {"layers": [1, 3]}}
    elif case == "top_k above vocab":
        sections = {"cache": {"top_k": 513}}
    else:
        teacher, sections = assets["gpt2"], {"data": {"max_length": 256}}
    config = write_config(tmp_path, teacher, data, **sections)
    assert_refused(config, code, pattern)
    assert not os.path.exists(cache_path(config))


def test_a_directory_holding_another_cache_is_refused_naming_the_field(reference, assets, docs_path, tmp_path):
    url = str(tmp_path / "cache")
    shutil.copytree(reference, url)
    before = snapshot(url)
    config = write_config(tmp_path, assets["llama"], docs_path, cache={"top_k": 8})
    assert_refused(config, 1, r"holds a different cache: identity.top_k is 16 there but 8 in this run")
    assert snapshot(url) == before


def test_a_directory_holding_other_files_is_refused(tmp_path, assets, docs_path):
    config = write_config(tmp_path, assets["llama"], docs_path)
    os.makedirs(cache_path(config))
    Path(cache_path(config), "notes.txt").write_text("mine")
    assert_refused(config, 2, r"directory is not empty and holds no sad-pipe cache")
    assert os.listdir(cache_path(config)) == ["notes.txt"]


def test_a_teacher_producing_nan_is_refused_naming_the_sequences(reference, docs_path, tmp_path):
    """An untied teacher whose embedding of one token is NaN: exactly the sequences holding it go bad."""
    tokens = read_all(reference)["train"]["input_ids"]
    first_shard = {int(t): int(np.nonzero((tokens == t).any(1))[0][0]) // PER_SHARD for t in np.unique(tokens)}
    token = next(t for t, shard in sorted(first_shard.items()) if shard == 1)  # shard 0 is clean, shard 1 is not
    bad_rows = [int(i) for i in np.nonzero((tokens[PER_SHARD:2 * PER_SHARD] == token).any(1))[0] + PER_SHARD]

    path = save_llama(str(tmp_path / "nan-teacher"), 512, tied=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("nan")
    model.save_pretrained(path)
    shutil.copytree(Path(reference) / "tokenizer", path, dirs_exist_ok=True)

    config = write_config(tmp_path, path, docs_path)
    assert_refused(config, 1, re.escape(f"teacher produced NaN/Inf logits for train sequences {bad_rows} (shard 1)"))
    url = cache_path(config)
    assert committed(url) == {("train", 0)} and not os.path.exists(os.path.join(url, "manifest.json"))
    assert_no_leftovers(url)


# -- dry run ----------------------------------------------------------------------------------------------

def test_dry_run_projects_the_cache_and_writes_nothing(reference, assets, docs_path, tmp_path):
    config = write_config(tmp_path, assets["llama"], docs_path)
    plan = json.loads(run(config, "--dry-run", "--json").stdout)
    assert not os.path.exists(cache_path(config))
    real = CacheReader(reference).manifest
    assert plan["sequences"] == {s: v["sequences"] for s, v in real["splits"].items()}
    assert plan["tokens"] == {s: v["tokens"] for s, v in real["splits"].items()}
    actual = real["summary"]["bytes_per_token_by_array"]
    assert set(plan["projected_bytes"]) == {"input_ids", *real["arrays"], "total"}
    for name, per_token in plan["projected_bytes_per_token"].items():
        if name != "total":  # from 8 sample sequences: the right order of magnitude, not the exact size
            assert actual[name] / 3 < per_token < actual[name] * 3, (name, per_token, actual[name])
    text = run(config, "--dry-run").stdout
    assert all(name in text for name in ("sequences", "tokens", "topk_ids", "lse", "hidden_1", "hidden_2"))
    assert not os.path.exists(cache_path(config))


# -- chat data -------------------------------------------------------------------------------------------

def test_chat_data_stores_teacher_outputs_only_for_the_assistants_tokens(assets, tmp_path):
    """format messages: the cache stores the assistant mask, the prompt positions hold no teacher outputs (so
    the top-k arrays shrink next to a loss.mask all cache of the same data) and inspect tells the share."""
    from conftest import special_tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(assets["llama"], teacher)
    special_tokenizer(str(teacher), assets["docs"][:30], bos=True, chat=True)  # an "Instruct" teacher's tokenizer
    words = " ".join(assets["docs"][3].split()[:400]).split()
    rows = [[{"role": "system", "content": " ".join(words[i:i + 30])}, {"role": "user", "content": " ".join(words[i + 30:i + 60])},
             {"role": "assistant", "content": " ".join(words[i + 60:i + 70])}] for i in range(0, 300, 10)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    sizes = {}
    for mask in ("assistant", "all"):
        config = write_config(tmp_path / mask, str(teacher), str(data), teacher={"layers": []},
                              data={"format": "messages", "eval_fraction": 0.0}, loss={"mask": mask})
        run(config)
        report = json.loads(cli("inspect", cache_path(config), "--json").stdout)
        sizes[mask] = report
        arrays = read_all(cache_path(config), {"input_ids", "topk"})["train"]
        trained = arrays["loss_mask"].astype(bool)
        assert (arrays["topk_ids"][~trained] == 0).all() and (arrays["topk_ids"][trained].max(-1) > 0).all()
    share = sizes["assistant"]["stored_positions_share"]
    assert 0.05 < share < 0.35 and sizes["all"]["stored_positions_share"] > 0.9
    topk = {m: sum(v for k, v in r["bytes_per_token_by_array"].items() if k.startswith("topk")) for m, r in sizes.items()}
    assert topk["assistant"] < 0.5 * topk["all"]
    assert CacheReader(sizes["assistant"]["cache"]).identity["packing"]["loss_mask"] == "assistant"
