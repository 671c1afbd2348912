"""Documents -> packed token sequences, deterministically.

`load_dataset` reads a hub dataset or local files. Each document is tokenized with the teacher's
tokenizer, followed by EOS, and the stream is cut into sequences of `max_length` tokens: sequence i
is always the same tokens for the same input. A document goes to the eval split when a hash of its
text falls below `eval_fraction`, so the split is stable when documents are added or reordered.
The incomplete tail of each split's stream (< max_length tokens) is dropped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from sad_pipe.errors import DataError
from sad_pipe.pipeline.config import DataConfig

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TOKENIZE_BATCH = 256


def local_files(path: str) -> list[str] | None:
    """The data files behind a local path (file, directory or glob), or None if `path` is not local."""
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.splitext(p)[1] in BUILDERS)
        if not files:
            raise DataError(f"data.path {path}: directory holds no {', '.join(sorted(BUILDERS))} files")
        return files
    if os.path.isfile(path):
        return [path]
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise DataError(f"data.path {path}: the pattern matches no files")
        return files
    if path.startswith((".", "/", "~")) or os.path.splitext(path)[1] in BUILDERS:
        raise DataError(f"data.path {path}: no such file or directory")
    return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(cfg: DataConfig) -> dict:
    """What identifies the documents: the source and, for local files, their content hashes."""
    files = local_files(cfg.path)
    fp = {"path": cfg.path if files is None else None, "name": cfg.name, "split": cfg.split,
          "revision": cfg.revision, "text_field": cfg.text_field, "max_documents": cfg.max_documents,
          "eval_fraction": cfg.eval_fraction}
    if files is not None:
        fp["files"] = {os.path.basename(f) if len(files) == 1 else os.path.relpath(f, os.path.commonpath(files)): _sha256(f)
                       for f in files}
    return fp


def load_documents(cfg: DataConfig):
    """The dataset as an iterable of rows, through `datasets.load_dataset` (hub or local files)."""
    import datasets

    files = local_files(cfg.path)
    try:
        if files is not None:
            exts = {os.path.splitext(f)[1] for f in files}
            builders = {BUILDERS.get(e) for e in exts}
            if None in builders or len(builders) != 1:
                raise DataError(f"data.path {cfg.path}: mixed or unsupported file types {sorted(exts)}; "
                                f"use one of {', '.join(sorted(BUILDERS))}")
            if all(os.path.getsize(f) == 0 for f in files):  # `datasets` fails on these with a bare StopIteration
                raise DataError(f"data.path {cfg.path}: empty (no documents)")
            builder = builders.pop()
            extra = {"sample_by": "document"} if builder == "text" else {}  # one .txt file = one document
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=cfg.streaming, **extra)
        else:
            ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, revision=cfg.revision, streaming=cfg.streaming)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.path {cfg.path}: cannot load dataset ({type(exc).__name__}: {first})") from None
    columns = ds.column_names
    if columns is not None and cfg.text_field not in columns:
        raise DataError(f"data.text_field {cfg.text_field!r} is not a column of {cfg.path} (columns: {', '.join(columns)})")
    if cfg.max_documents is not None:
        ds = ds.take(cfg.max_documents) if cfg.streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


def is_eval(text: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h / 2.0**64 < fraction


@dataclass
class Packer:
    """Concatenates documents (each followed by EOS) and emits full sequences of `max_length` tokens."""

    max_length: int
    eos_id: int
    buffer: list[int] = field(default_factory=list)
    doc_of_token: list[int] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    sequences: int = 0

    def add(self, doc_index: int, ids: list[int]) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
        self.buffer.extend(ids)
        self.buffer.append(self.eos_id)
        self.doc_of_token.extend([doc_index] * (len(ids) + 1))
        self.documents += 1
        self.tokens += len(ids) + 1
        full = len(self.buffer) // self.max_length * self.max_length
        if not full:
            return
        seqs = np.asarray(self.buffer[:full], dtype=np.int64).reshape(-1, self.max_length)
        docs = self.doc_of_token[:full]
        del self.buffer[:full], self.doc_of_token[:full]
        for i, seq in enumerate(seqs):
            self.sequences += 1
            yield seq, (docs[i * self.max_length], docs[(i + 1) * self.max_length - 1])

    @property
    def dropped(self) -> int:
        return len(self.buffer)


def document_batches(cfg: DataConfig, size: int = TOKENIZE_BATCH) -> Iterator[list[tuple[int, str]]]:
    """The non-empty documents as batches of (dataset row index, text), `size` rows read per batch."""
    field_name = cfg.text_field
    batch: list[tuple[int, str]] = []
    rows = 0
    for doc, row in enumerate(load_documents(cfg)):
        text = row.get(field_name)
        if not isinstance(text, str):
            raise DataError(f"data.text_field {field_name!r}: document {doc} of {cfg.path} holds "
                            f"{type(text).__name__}, expected text")
        if text:
            batch.append((doc, text))
        rows += 1
        if rows == size:
            yield batch
            batch, rows = [], 0
    if rows:
        yield batch


@dataclass
class TokenizedBatch:
    """One batch of documents tokenized: row index, split ("train"/"eval") and token ids of each."""

    docs: list[int]
    splits: list[str]
    ids: list[list[int]]


def tokenize_batch(cfg: DataConfig, tokenizer, batch: list[tuple[int, str]]) -> TokenizedBatch:
    encoded = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"] if batch else []
    return TokenizedBatch(docs=[d for d, _ in batch],
                          splits=["eval" if is_eval(t, cfg.eval_fraction) else "train" for _, t in batch], ids=encoded)


class PackedDocuments:
    """Iterates (split, token ids [max_length], (first_doc, last_doc)) in order for 'train' and 'eval'.

    `batches` are the tokenized documents in dataset order; by default they are read and tokenized here
    (stage one under torchrun tokenizes on every rank and passes the merged batches in). Afterwards
    `packers[split]` tells documents, tokens, sequences and the dropped tail."""

    def __init__(self, cfg: DataConfig, tokenizer, on_documents=None, batches=None):
        if tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; sad-pipe separates documents with it")
        self.cfg, self.tokenizer, self.on_documents, self.batches = cfg, tokenizer, on_documents, batches
        self.packers = {s: Packer(cfg.max_length, tokenizer.eos_token_id) for s in ("train", "eval")}

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, tuple[int, int]]]:
        batches = self.batches
        if batches is None:
            batches = (tokenize_batch(self.cfg, self.tokenizer, b) for b in document_batches(self.cfg))
        for batch in batches:
            for doc, split, ids in zip(batch.docs, batch.splits, batch.ids):
                for seq, span in self.packers[split].add(doc, ids):
                    yield split, seq, span
            if self.on_documents is not None:
                self.on_documents(len(batch.docs))
