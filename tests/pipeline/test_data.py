"""Documents -> packed sequences: the stream is the documents tokenized one by one and joined with EOS,
split by the hash rule, the same on every run, from every local file format `datasets` reads."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from sad_pipe.errors import DataError
from sad_pipe.pipeline.config import DataConfig
from sad_pipe.pipeline.data import PackedDocuments, dataset_fingerprint, is_eval, load_documents

MAX_LENGTH = 32
EVAL_FRACTION = 0.3


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets["tokenizer"])


@pytest.fixture(scope="module")
def docs(assets) -> list[str]:
    """Ten short documents, both splits represented (chosen by the rule itself, not by luck)."""
    train = [d[:500] for d in assets["docs"] if not is_eval(d[:500], EVAL_FRACTION)][:7]
    held = [d[:500] for d in assets["docs"] if is_eval(d[:500], EVAL_FRACTION)][:3]
    assert len(train) == 7 and len(held) == 3
    return [held[0], *train[:4], held[1], *train[4:], held[2]]


def data_config(path, **kw) -> DataConfig:
    return DataConfig(**{"path": str(path), "max_length": MAX_LENGTH, "eval_fraction": EVAL_FRACTION, **kw})


def expected_sequences(tokenizer, docs: list[str], split: str) -> np.ndarray:
    """The reference: each document of the split tokenized alone, followed by EOS, cut into full sequences."""
    stream: list[int] = []
    for d in docs:
        if is_eval(d, EVAL_FRACTION) == (split == "eval"):
            stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // MAX_LENGTH
    return np.asarray(stream[:n * MAX_LENGTH]).reshape(n, MAX_LENGTH)


def packed(cfg: DataConfig, tokenizer) -> dict[str, np.ndarray]:
    out: dict[str, list] = {"train": [], "eval": []}
    for seq in PackedDocuments(cfg, tokenizer):
        out[seq.split].append(seq.input_ids)
    return {s: np.stack(v) for s, v in out.items()}


def write_jsonl(path, docs: list[str], field: str = "text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def test_the_stream_is_the_documents_tokenized_one_by_one_and_joined_with_eos(tmp_path, tokenizer, docs):
    cfg = data_config(write_jsonl(tmp_path / "docs.jsonl", docs))
    got = packed(cfg, tokenizer)
    for split in ("train", "eval"):
        np.testing.assert_array_equal(got[split], expected_sequences(tokenizer, docs, split))
    assert len(got["eval"]) >= 2 and len(got["train"]) >= 2 * len(got["eval"])


def test_counts_and_document_spans_describe_the_stream(tmp_path, tokenizer, docs):
    cfg = data_config(write_jsonl(tmp_path / "docs.jsonl", docs))
    packer = PackedDocuments(cfg, tokenizer)
    spans = {"train": [], "eval": []}
    for seq in packer:
        spans[seq.split].append(seq.doc_span)
    for split in ("train", "eval"):
        p = packer.packers[split]
        members = [i for i, d in enumerate(docs) if is_eval(d, EVAL_FRACTION) == (split == "eval")]
        lengths = [len(tokenizer(docs[i], add_special_tokens=False)["input_ids"]) + 1 for i in members]
        assert p.documents == len(members) and p.tokens == sum(lengths)
        assert p.sequences * MAX_LENGTH + p.dropped == p.tokens and 0 <= p.dropped < MAX_LENGTH
        # The document owning the first / last token of sequence s, from the token counts alone.
        owner = np.repeat(members, lengths)
        expected = [(owner[s * MAX_LENGTH], owner[(s + 1) * MAX_LENGTH - 1]) for s in range(p.sequences)]
        assert spans[split] == expected


def test_sequence_i_is_the_same_on_a_rerun_and_the_split_survives_reordering(tmp_path, tokenizer, docs):
    cfg = data_config(write_jsonl(tmp_path / "docs.jsonl", docs))
    first, second = packed(cfg, tokenizer), packed(cfg, tokenizer)
    for split in ("train", "eval"):
        np.testing.assert_array_equal(first[split], second[split])
    # Reordering documents changes the order of the stream but not which documents are held out.
    held = {d for d in docs if is_eval(d, EVAL_FRACTION)}
    reordered = data_config(write_jsonl(tmp_path / "reordered.jsonl", docs[::-1]))
    assert {d for d in docs[::-1] if is_eval(d, EVAL_FRACTION)} == held
    np.testing.assert_array_equal(packed(reordered, tokenizer)["eval"], expected_sequences(tokenizer, docs[::-1], "eval"))


def test_eval_fraction_zero_holds_nothing_out():
    assert not any(is_eval(t, 0.0) for t in ("a", "b", "c"))
    share = np.mean([is_eval(f"document {i}", 0.25) for i in range(4000)])
    assert 0.22 < share < 0.28  # the hash spreads documents evenly


@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl", "parquet"])
def test_every_local_format_loads_through_datasets_to_the_same_stream(tmp_path, tokenizer, docs, fmt):
    if fmt == "txt":  # one file per document
        path = tmp_path / "txt"
        path.mkdir()
        for i, d in enumerate(docs):
            (path / f"{i:02d}.txt").write_text(d)
    elif fmt == "json":  # one JSON array of records
        path = tmp_path / "docs.json"
        path.write_text(json.dumps([{"text": d, "id": i} for i, d in enumerate(docs)]))
    elif fmt == "jsonl":
        path = write_jsonl(tmp_path / "docs.jsonl", docs)
    else:
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path)
    assert [row["text"] for row in load_documents(data_config(path))] == docs
    got = packed(data_config(path), tokenizer)
    for split in ("train", "eval"):
        np.testing.assert_array_equal(got[split], expected_sequences(tokenizer, docs, split))


def test_max_documents_and_streaming_read_the_same_prefix(tmp_path, tokenizer, docs):
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    full = packed(data_config(path, max_documents=6), tokenizer)
    streamed = packed(data_config(path, max_documents=6, streaming=True), tokenizer)
    for split in ("train", "eval"):
        np.testing.assert_array_equal(full[split], expected_sequences(tokenizer, docs[:6], split))
        np.testing.assert_array_equal(streamed[split], full[split])


def test_fingerprint_follows_the_file_contents(tmp_path, docs):
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    before = dataset_fingerprint(data_config(path))
    assert dataset_fingerprint(data_config(path)) == before
    write_jsonl(path, docs[:-1])
    assert dataset_fingerprint(data_config(path))["files"] != before["files"]


@pytest.mark.parametrize("case, message", [
    ("missing file", "no such file or directory"),
    ("missing hub dataset", "cannot load dataset"),
    ("empty file", "empty"),
    ("no such column", "data.text_field 'body' is not a column"),
    ("not text", "document 1 of .* holds int, expected text"),
])
def test_unusable_data_is_a_data_error_naming_the_key(tmp_path, tokenizer, case, message):
    path, field = tmp_path / "docs.jsonl", "body" if case == "no such column" else "text"
    if case == "missing file":
        path = tmp_path / "nowhere" / "docs.jsonl"
    elif case == "missing hub dataset":
        path = "sad-pipe-tests/no-such-dataset"
    elif case == "empty file":
        path.write_text("")
    elif case == "not text":
        path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 7}) + "\n")
    else:
        write_jsonl(path, ["a document"])
    with pytest.raises(DataError, match=message) as err:
        list(PackedDocuments(DataConfig(path=str(path), text_field=field, max_length=MAX_LENGTH), tokenizer))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


# -- what the teacher sees: the tokenizer's own special tokens, documents attended alone, chat data -----------

@pytest.fixture(scope="module")
def real_tokenizers(assets, tmp_path_factory):
    """Tokenizers of both kinds: one adding its BOS like Llama's, one adding nothing like Qwen's; both chat-capable."""
    from conftest import special_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {bos: AutoTokenizer.from_pretrained(special_tokenizer(str(root / str(bos)), assets["docs"][:30], bos=bos, chat=True))
            for bos in (True, False)}


@pytest.mark.parametrize("bos", [True, False], ids=["bos-added", "no-bos"])
def test_each_packed_document_is_the_tokenizers_own_ids_followed_by_eos(tmp_path, real_tokenizers, docs, bos):
    tokenizer = real_tokenizers[bos]
    cfg = data_config(write_jsonl(tmp_path / "docs.jsonl", docs), eval_fraction=0.0)
    stream = np.concatenate([seq.input_ids for seq in PackedDocuments(cfg, tokenizer)])
    expected = []
    for d in docs:
        ids = tokenizer(d)["input_ids"]
        assert (ids[0] == tokenizer.bos_token_id) == bos  # the tokenizer's own choice, none invented
        expected += ids + [tokenizer.eos_token_id]
    np.testing.assert_array_equal(stream, expected[:len(stream)])
    assert len(expected) - len(stream) < MAX_LENGTH


def test_positions_restart_per_document_and_no_position_predicts_the_next_document(tmp_path, real_tokenizers, docs):
    tokenizer = real_tokenizers[True]
    short = [d[:20] for d in docs] * 3  # several documents per sequence
    cfg = data_config(write_jsonl(tmp_path / "docs.jsonl", short), eval_fraction=0.0)
    seqs = list(PackedDocuments(cfg, tokenizer))
    bos = tokenizer.bos_token_id
    for seq in seqs:
        ids, pos, mask = seq.input_ids, seq.position_ids, seq.loss_mask
        starts = np.flatnonzero(pos == 0)
        assert starts[0] == 0 and len(starts) >= 2
        assert (ids[starts[1:]] == bos).all()  # every document inside the sequence starts at 0 with its BOS
        for a, b in zip(starts[1:], [*starts[2:], len(ids)]):
            np.testing.assert_array_equal(pos[a:b], np.arange(b - a))
        # An EOS never learns to predict the next document's BOS; every other position is trained (the last
        # one too, when its document goes on in the next sequence).
        untrained = set(np.flatnonzero(mask == 0).tolist())
        assert set((starts[1:] - 1).tolist()) <= untrained <= set((starts[1:] - 1).tolist()) | {len(ids) - 1}
    # stream packing: one run of positions per sequence, every position trained (documents attend to each other)
    stream = list(PackedDocuments(data_config(cfg.path, eval_fraction=0.0, packing="stream"), tokenizer))
    assert all((s.position_ids == np.arange(MAX_LENGTH)).all() for s in stream)
    assert all(s.loss_mask.all() for s in stream[:-1])
    np.testing.assert_array_equal(np.concatenate([s.input_ids for s in stream]),
                                  np.concatenate([s.input_ids for s in seqs]))


CONVERSATIONS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add two and two"},
     {"role": "assistant", "content": "four"}, {"role": "user", "content": "and three more"},
     {"role": "assistant", "content": "seven, as the sum grows"}],
    [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "blue like the sea"}],
]


def test_chat_data_is_rendered_with_the_template_and_only_assistant_tokens_are_trained(tmp_path, real_tokenizers):
    tokenizer = real_tokenizers[True]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 6))
    cfg = DataConfig(path=str(path), format="messages", max_length=MAX_LENGTH, eval_fraction=0.0)
    seqs = list(PackedDocuments(cfg, tokenizer, loss_mask="assistant"))
    ids = np.concatenate([s.input_ids for s in seqs])
    mask = np.concatenate([s.loss_mask for s in seqs])
    # The reference: the template's rendering, and the tokens of each assistant turn (its content and <|end|>).
    rendered = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    first = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ids[:len(first)], first)
    trained_targets = [int(ids[t + 1]) for t in range(len(first) - 1) if mask[t]]
    want = (tokenizer("four<|end|>", add_special_tokens=False)["input_ids"]
            + tokenizer("seven, as the sum grows<|end|>", add_special_tokens=False)["input_ids"])
    assert trained_targets == want
    assert 0 < mask.mean() < 0.6
    everything = np.concatenate([s.loss_mask for s in PackedDocuments(cfg, tokenizer, loss_mask="all")])
    assert everything.sum() > 2 * mask.sum()


@pytest.mark.parametrize("rows, message", [
    ([{"messages": "hello"}], "is not a list of"),
    ([{"messages": [{"role": "user", "text": "hi"}]}], "is not a list of"),
    ([{"messages": [{"role": "user", "content": "no answer here"}]}], "has no assistant tokens to train on"),
])
def test_bad_chat_rows_are_refused_naming_the_document(tmp_path, real_tokenizers, rows, message):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(path), format="messages", max_length=MAX_LENGTH, eval_fraction=0.0)
    with pytest.raises(DataError, match=f"document 0 .*{message}|{message}"):
        list(PackedDocuments(cfg, real_tokenizers[True], loss_mask="assistant"))


def test_chat_data_needs_a_tokenizer_with_a_chat_template(tmp_path, tokenizer):
    cfg = DataConfig(path=str(tmp_path / "x.jsonl"), format="messages", max_length=MAX_LENGTH)
    with pytest.raises(DataError, match="has no chat template"):
        PackedDocuments(cfg, tokenizer)
