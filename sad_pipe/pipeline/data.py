"""Documents -> packed token sequences, deterministically.

`load_dataset` reads a hub dataset or local files. Each document is tokenized with the teacher's
tokenizer exactly as `tokenizer(text)` does (its own BOS where it adds one, none where it has none),
followed by EOS unless the tokenizer already ends it so; a chat document (`data.format: messages`) is
rendered with the tokenizer's chat template first, and its assistant tokens are marked. The stream of
documents is cut into sequences of `max_length` tokens: sequence i is always the same tokens for the
same input. Per token the packer also records

    position_ids  position within its document's piece of the sequence (0 where a document, or the
                  sequence, starts): with `packing: documents` the models attend within a piece only,
                  as if it stood alone; with `stream` positions run 0..T-1 and attention crosses documents
    loss_mask     1 where the prediction at this position (of the next token) is trained: the next
                  token is a target (every token of a text, the assistant's tokens of a chat) of the
                  same piece (with `documents`: never the next document's first token)

A document goes to the eval split when a hash of its text falls below `eval_fraction`, so the split
is stable when documents are added or reordered. The incomplete tail of each split's stream
(< max_length tokens) is dropped and counted.
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


def field_of(cfg: DataConfig) -> str:
    """The column holding each document: its text, or its list of chat messages."""
    return cfg.messages_field if cfg.format == "messages" else cfg.text_field


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
          "revision": cfg.revision, "format": cfg.format, "field": field_of(cfg), "max_documents": cfg.max_documents,
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
    if columns is not None and field_of(cfg) not in columns:
        key = "messages_field" if cfg.format == "messages" else "text_field"
        raise DataError(f"data.{key} {field_of(cfg)!r} is not a column of {cfg.path} (columns: {', '.join(columns)})")
    if cfg.max_documents is not None:
        ds = ds.take(cfg.max_documents) if cfg.streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


def is_eval(text: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h / 2.0**64 < fraction


@dataclass
class Document:
    """One tokenized document: its dataset row, split, token ids and which tokens are learned as targets."""

    row: int
    split: str
    ids: list[int]
    targets: list[bool]


@dataclass
class PackedSequence:
    split: str
    input_ids: np.ndarray  # [T] int64
    position_ids: np.ndarray  # [T] int64
    loss_mask: np.ndarray  # [T] uint8
    doc_span: tuple[int, int]  # dataset rows of the first and the last document it holds


@dataclass
class Packer:
    """Concatenates documents and emits full sequences of `max_length` tokens with their positions and mask.

    A sequence is emitted once the token after it is known (its last position's mask depends on it), or
    by `finish()` at the end of the stream."""

    max_length: int
    documents_attend_alone: bool = True
    ids: list[int] = field(default_factory=list)
    doc_of_token: list[int] = field(default_factory=list)
    targets: list[bool] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    sequences: int = 0
    trained_positions: int = 0
    max_token_id: int = 0

    def add(self, doc: Document) -> Iterator[PackedSequence]:
        self.ids += doc.ids
        self.doc_of_token += [doc.row] * len(doc.ids)
        self.targets += doc.targets
        self.documents += 1
        self.tokens += len(doc.ids)
        self.max_token_id = max(self.max_token_id, max(doc.ids, default=0))
        yield from self._emit(lookahead=True)

    def finish(self) -> Iterator[PackedSequence]:
        yield from self._emit(lookahead=False)

    def _emit(self, lookahead: bool) -> Iterator[PackedSequence]:
        t = self.max_length
        while len(self.ids) > t or (not lookahead and len(self.ids) == t):
            ids = np.asarray(self.ids[:t + 1], dtype=np.int64)
            docs = np.asarray(self.doc_of_token[:t + 1], dtype=np.int64)
            targets = np.asarray(self.targets[:t + 1], dtype=bool)
            if len(ids) == t:  # the end of the stream: nothing follows the last position
                docs, targets = np.append(docs, -1), np.append(targets, False)
            starts = np.ones(t, dtype=bool)
            if self.documents_attend_alone:
                starts[1:] = docs[1:t] != docs[:t - 1]
            else:
                starts[1:] = False
            index = np.arange(t)
            positions = index - np.maximum.accumulate(np.where(starts, index, 0))
            same_piece = docs[1:] == docs[:-1] if self.documents_attend_alone else docs[1:] >= 0
            mask = (targets[1:] & same_piece).astype(np.uint8)
            self.sequences += 1
            self.trained_positions += int(mask.sum())
            del self.ids[:t], self.doc_of_token[:t], self.targets[:t]
            yield PackedSequence("", ids[:t], positions, mask, (int(docs[0]), int(docs[t - 1])))

    @property
    def dropped(self) -> int:
        return len(self.ids)


def document_batches(cfg: DataConfig, size: int = TOKENIZE_BATCH) -> Iterator[list[tuple[int, object]]]:
    """The non-empty documents as batches of (dataset row index, text or messages), `size` rows read per batch."""
    name = field_of(cfg)
    batch: list[tuple[int, object]] = []
    rows = 0
    for doc, row in enumerate(load_documents(cfg)):
        value = row.get(name)
        if cfg.format == "messages":
            _check_messages(value, doc, cfg)
        elif not isinstance(value, str):
            raise DataError(f"data.text_field {name!r}: document {doc} of {cfg.path} holds "
                            f"{type(value).__name__}, expected text")
        if value:
            batch.append((doc, value))
        rows += 1
        if rows == size:
            yield batch
            batch, rows = [], 0
    if rows:
        yield batch


def _check_messages(value, doc: int, cfg: DataConfig) -> None:
    ok = isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in value)
    if not ok:
        found = type(value).__name__ if not isinstance(value, list) else next(
            (repr(m)[:60] for m in value if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str))), "?")
        raise DataError(f"data.messages_field {cfg.messages_field!r}: document {doc} of {cfg.path} is not a list of "
                        f"{{\"role\": str, \"content\": str}} messages (found {found})")


@dataclass
class TokenizedBatch:
    """One batch of documents tokenized, in dataset order."""

    documents: list[Document]


def check_tokenizer_for(cfg: DataConfig, tokenizer) -> None:
    """Refuse, before any data is read, a tokenizer this data format cannot use."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; sad-pipe ends documents with it")
    if cfg.format == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"data.format messages: tokenizer {tokenizer.name_or_path!r} has no chat template to render "
                            "the conversations with; use an instruct model's tokenizer (or set one as data.tokenizer), "
                            "or data.format text")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"data.format messages: tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer; "
                            "finding the assistant's tokens needs its character offsets")


def tokenize_batch(cfg: DataConfig, tokenizer, batch: list[tuple[int, object]], loss_mask: str = "all") -> TokenizedBatch:
    """Token ids as the tokenizer itself makes them, EOS appended where it does not end the document.
    loss_mask "assistant" (chat data): only the assistant's tokens are targets."""
    eos = tokenizer.eos_token_id
    out = []
    if cfg.format == "messages":
        rendered = [_render(tokenizer, messages, row) for row, messages in batch]
        texts = [text for text, _ in rendered]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {"input_ids": []}
        for (row, _), (text, spans), ids, offsets in zip(batch, rendered, enc["input_ids"], enc.get("offset_mapping", [])):
            targets = [loss_mask == "all" or any(a < e and b > s for s, e in spans) for a, b in offsets]
            if loss_mask == "assistant" and not any(targets):
                raise DataError(f"data.path {cfg.path}: document {row} has no assistant tokens to train on "
                                f"(loss.mask assistant); drop it or use loss.mask all")
            out.append(_ended(Document(row, "eval" if is_eval(text, cfg.eval_fraction) else "train", ids, targets), eos,
                              loss_mask == "all"))
    else:
        enc = tokenizer([t for _, t in batch])["input_ids"] if batch else []
        for (row, text), ids in zip(batch, enc):
            out.append(_ended(Document(row, "eval" if is_eval(text, cfg.eval_fraction) else "train", ids, [True] * len(ids)),
                              eos, True))
    return TokenizedBatch(out)


def _ended(doc: Document, eos: int, eos_is_target: bool) -> Document:
    if not doc.ids or doc.ids[-1] != eos:
        doc.ids.append(eos)
        doc.targets.append(eos_is_target)
    return doc


def _render(tokenizer, messages: list[dict], row: int) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template renders it, and the character span of each assistant turn:
    what rendering it adds to the conversation before it (with the generation prompt), up to its end."""
    def render(upto: list[dict], prompt: bool) -> str:  # templates refuse an empty conversation
        return tokenizer.apply_chat_template(upto, tokenize=False, add_generation_prompt=prompt) if upto else ""

    try:
        text = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[:i + 1], False)
            if not (text.startswith(through) and through.startswith(before)):
                raise DataError(f"data.format messages: document {row}: the chat template does not render the "
                                "conversation as the extension of its first turns, so its assistant tokens cannot "
                                "be found; use loss.mask all")
            spans.append((len(before), len(through)))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - jinja errors of the template (e.g. it refuses a role order)
        raise DataError(f"data.format messages: document {row}: the chat template failed "
                        f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None
    return text, spans


class PackedDocuments:
    """Iterates PackedSequence for 'train' and 'eval' in order.

    `batches` are the tokenized documents in dataset order; by default they are read and tokenized here
    (stage one under torchrun tokenizes on every rank and passes the merged batches in). Afterwards
    `packers[split]` tells documents, tokens, sequences, trained positions and the dropped tail."""

    def __init__(self, cfg: DataConfig, tokenizer, on_documents=None, batches=None, loss_mask: str = "all"):
        check_tokenizer_for(cfg, tokenizer)
        self.cfg, self.tokenizer, self.on_documents, self.batches = cfg, tokenizer, on_documents, batches
        self.loss_mask = loss_mask
        self.packers = {s: Packer(cfg.max_length, cfg.packing == "documents") for s in ("train", "eval")}

    def __iter__(self) -> Iterator[PackedSequence]:
        batches = self.batches
        if batches is None:
            batches = (tokenize_batch(self.cfg, self.tokenizer, b, self.loss_mask) for b in document_batches(self.cfg))
        for batch in batches:
            for doc in batch.documents:
                for seq in self.packers[doc.split].add(doc):
                    seq.split = doc.split
                    yield seq
            if self.on_documents is not None:
                self.on_documents(len(batch.documents))
        for split, packer in self.packers.items():
            for seq in packer.finish():
                seq.split = split
                yield seq
