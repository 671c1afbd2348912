"""What stage one will do, fixed before the teacher runs: the teacher and its checks, the cache identity,
the packed tokens and the shard table (plan.json). Nothing is visible to readers until plan.json exists;
a failure before it leaves only garbage that the next run's gc removes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile

import numpy as np
import torch

from sad_pipe.errors import ConfigError, DataError, IdentityMismatch
from sad_pipe.pipeline.config import Config, hidden_positions
from sad_pipe.pipeline.data import (
    Document,
    PackedDocuments,
    TokenizedBatch,
    check_tokenizer_for,
    dataset_fingerprint,
    document_batches,
    tokenize_batch,
)
from sad_pipe.pipeline.fingerprint import describe_change
from sad_pipe.pipeline.models import (
    load_causal_lm,
    load_tokenizer,
    max_positions_of,
    num_layers_of,
    require_local_path,
    resolve_device,
    resolve_dtype,
    teacher_identity,
    tokenizer_fingerprint,
    vocab_size_of,
)
from sad_pipe.pipeline.progress import progress_bar
from sad_pipe.stages.cache_teacher.basis import fit_basis
from sad_pipe.stages.cache_teacher.runner import attends_within_documents
from sad_pipe.storage.codecs import id_dtype
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.hidden import BASIS_FILE, hidden_rank
from sad_pipe.storage.manifest import Plan, check_identity, read_plan
from sad_pipe.storage.reader import open_tokens
from sad_pipe.storage.verify import holds_only_unplanned_leftovers
from sad_pipe.storage.writer import TokenWriter, create_plan, hash_tree, sha256_file

log = logging.getLogger(__name__)


def load_teacher(cfg: Config):
    """(tokenizer, teacher or None, device, tokenizer name), checked against the config."""
    tok_name = cfg.data.tokenizer or cfg.teacher.model
    if tok_name is None:
        raise ConfigError("data.tokenizer: required when teacher.model is null (a tokens-only cache needs a tokenizer)")
    if cfg.teacher.model is not None:  # before the tokenizer, which usually comes from the same path
        require_local_path(cfg.teacher.model, "teacher.model")
    tokenizer = load_tokenizer(tok_name, revision=None if cfg.data.tokenizer else cfg.teacher.revision,
                               trust_remote_code=cfg.teacher.trust_remote_code)
    loss_mask_mode(cfg)
    check_tokenizer_for(cfg.data, tokenizer)  # before the teacher loads: seconds, not minutes
    if cfg.teacher.model is None:
        return tokenizer, None, torch.device("cpu"), tok_name
    device = resolve_device(cfg.teacher.device)
    teacher = load_causal_lm(cfg.teacher.model, revision=cfg.teacher.revision, dtype=resolve_dtype(cfg.teacher.dtype, device),
                             device=device, trust_remote_code=cfg.teacher.trust_remote_code, what="teacher")
    teacher.eval()
    _check_teacher(cfg, teacher, tokenizer)
    return tokenizer, teacher, device, tok_name


def _check_teacher(cfg: Config, teacher, tokenizer) -> None:
    problems = []
    n_layers, vocab = num_layers_of(teacher), vocab_size_of(teacher)
    bad = [i for i in cfg.teacher.layers if not 0 <= i <= n_layers]
    if bad:
        problems.append(f"teacher.layers {bad}: out of range; this teacher has hidden states 0..{n_layers}")
    width = getattr(teacher.config, "hidden_size", None)
    if cfg.teacher.layers and cfg.cache.hidden_rank is not None and width is not None and cfg.cache.hidden_rank > width:
        problems.append(f"cache.hidden_rank {cfg.cache.hidden_rank}: larger than the teacher's width ({width})")
    if cfg.cache.top_k > min(vocab, len(tokenizer)):
        problems.append(f"cache.top_k {cfg.cache.top_k}: larger than the teacher's vocabulary ({min(vocab, len(tokenizer))})")
    context = max_positions_of(teacher)
    if context is not None and cfg.data.max_length > context:
        problems.append(f"data.max_length {cfg.data.max_length}: longer than the teacher's context ({context})")
    if len(tokenizer) > vocab:
        problems.append(f"tokenizer has {len(tokenizer)} tokens but the teacher only {vocab} logits: not this teacher's tokenizer")
    if problems:
        raise ConfigError(problems)
    if cfg.data.packing == "documents" and not attends_within_documents(teacher, min(vocab, len(tokenizer))):
        raise ConfigError(f"data.packing documents: teacher {cfg.teacher.model!r} does not restrict its attention to "
                          "each document when position_ids restart (its modelling code ignores them); use "
                          "data.packing stream to cache it as it attends, across the packed documents")


def cache_identity(cfg: Config, tokenizer, teacher, tokenizer_name: str) -> dict:
    """What the cache is a function of: two runs with the same identity write the same cache."""
    c, t = cfg.cache, cfg.teacher
    return {
        "teacher": None if teacher is None else teacher_identity(teacher, t.model, t.revision),
        "tokenizer": {"name": tokenizer_name, "sha256": tokenizer_fingerprint(tokenizer), "size": len(tokenizer),
                      "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        "dataset": dataset_fingerprint(cfg.data),
        "packing": {"max_length": cfg.data.max_length, "attention": cfg.data.packing, "format": cfg.data.format,
                    "loss_mask": loss_mask_mode(cfg), "adds_bos": adds_bos(tokenizer), "separator": "eos"},
        "top_k": c.top_k if teacher is not None else 0,
        "targets": None if teacher is None else {
            "forms": list(c.targets), **({"samples": c.samples, "temperature": c.sample_temperature, "seed": c.sample_seed}
                                         if {"sampled", "hybrid"} & set(c.targets) else {})},
        "temperatures": list(c.temperatures) if teacher is not None else [],
        "layers": list(t.layers) if teacher is not None else [],
        "values": c.values, "hidden_dtype": c.hidden_dtype,
        "store_target_logprob": c.store_target_logprob and teacher is not None,
        "sequences_per_shard": c.sequences_per_shard, "sequences_per_chunk": c.sequences_per_chunk,
        **_hidden_identity(cfg, teacher),
    }


def _hidden_identity(cfg: Config, teacher) -> dict:
    """How hidden states are stored, when not at full width and every position: absent then, so such caches
    keep the identity (and the bytes) they always had. The fit sample is part of it: it decides the basis."""
    c = cfg.cache
    if teacher is None or not cfg.teacher.layers or (c.hidden_rank is None and c.hidden_positions == "all"):
        return {}
    rank = {"rank": c.hidden_rank, "fit_tokens": c.hidden_fit_tokens} if c.hidden_rank else {"rank": None}
    return {"hidden": {**rank, "positions": hidden_positions(c.hidden_positions, c.sample_seed)}}


def loss_mask_mode(cfg: Config) -> str:
    """Which tokens are trained (and so get teacher outputs): loss.mask, by default assistant for chat data."""
    mode = cfg.loss.mask or ("assistant" if cfg.data.format == "messages" else "all")
    if mode == "assistant" and cfg.data.format != "messages":
        raise ConfigError("loss.mask assistant: only chat data has assistant tokens; set data.format messages "
                          "(with data.messages_field) or loss.mask all")
    return mode


def adds_bos(tokenizer) -> bool:
    """Whether tokenizer(text) starts a document with the tokenizer's BOS (Llama, Gemma) or not (Qwen, GPT-2)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def token_dtype(identity: dict) -> np.dtype:
    """input_ids hold the tokenizer's ids and, with a teacher, must also fit its (maybe padded) vocabulary."""
    return id_dtype(max(identity["tokenizer"]["size"], (identity["teacher"] or {}).get("vocab_size", 0)))


def open_cache(cfg: Config, identity: dict) -> tuple[CacheFS, Plan | None]:
    """The cache directory and its plan (None before the first run made one); refuses another cache's
    directory, or one holding files that are not a cache's."""
    cache = CacheFS(cfg.cache.path)
    if cache.is_local and os.path.isfile(cache.root):
        raise ConfigError(f"cache.path {cfg.cache.path}: is a file, expected a directory")
    plan = read_plan(cache)
    if plan is not None:
        check_same_teacher(plan.identity, identity, cfg.cache.path)
        check_identity(plan.identity, identity, cfg.cache.path)
    elif not holds_only_unplanned_leftovers(cache):  # a run killed before plan.json leaves only those
        raise ConfigError(f"cache.path {cfg.cache.path}: directory is not empty and holds no sad-pipe cache; "
                          "choose a new or empty directory")
    return cache, plan


def check_same_teacher(existing: dict, wanted: dict, where: str) -> None:
    """A cache is *of* its teacher: refuse, naming the file, a teacher whose weights, config or tokenizer
    files changed since the cache was started (retrained, re-downloaded, another checkpoint copied over)."""
    old, new = (existing.get("teacher") or {}), (wanted.get("teacher") or {})
    change = describe_change(old.get("fingerprint") or {}, new.get("fingerprint") or {}) if old and new else None
    if change:
        raise IdentityMismatch(f"{where} was built from another teacher than {new['model']!r} is now: {change}; "
                               "use another cache path, or delete that cache to rebuild it")


def create(cfg: Config, cache: CacheFS, tokenizer, identity: dict, batches=None, runner=None) -> Plan:
    """Pack the tokens, save the tokenizer, (low-rank caches) fit the hidden-state basis with `runner`, create
    plan.json. `batches`: the documents already tokenized (see tokenize_share); None tokenizes them here. On
    failure a cache directory this call created is removed again (nothing was committed)."""
    created_root = not cache.exists("")
    try:
        plan = _pack(cfg, cache, tokenizer, identity, batches)
        _save_tokenizer(cache, tokenizer)  # always: files a killed earlier attempt left may be partial or another's
        # The resolved config that built the cache (verify --repair reruns it); with the tokenizer, hashed
        # into the plan so that a change to either is caught like damage to a shard.
        cache.write_atomic("config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        plan.files = {"config.json": {"size": cache.size("config.json"), "sha256": sha256_file(cache, "config.json")},
                      **{f"tokenizer/{name}": info for name, info in hash_tree(cache, "tokenizer").items()}}
        rank = hidden_rank(identity)
        if rank:  # the basis step: before the plan, so the plan (and every resumed run) names this one basis
            basis = fit_basis(runner, open_tokens(cache, plan, "train"), rank, identity["hidden"]["fit_tokens"],
                              cfg.teacher.batch_size)
            cache.write_atomic(BASIS_FILE, basis.to_bytes())
            plan.files[BASIS_FILE] = {"size": cache.size(BASIS_FILE), "sha256": sha256_file(cache, BASIS_FILE)}
        return create_plan(cache, plan)
    except BaseException:
        if created_root and cache.is_local and not cache.exists("plan.json"):
            shutil.rmtree(cache.root, ignore_errors=True)
        raise


def _pack(cfg: Config, cache: CacheFS, tokenizer, identity: dict, batches=None) -> Plan:
    """Tokenize and pack every document into tokens/<split>, then describe the shards."""
    c = cfg.cache
    writers: dict[str, TokenWriter] = {}
    bar = progress_bar(desc="tokenize+pack", unit=" docs")
    packed = PackedDocuments(cfg.data, tokenizer, on_documents=bar.update, batches=batches, loss_mask=loss_mask_mode(cfg))
    dtype = token_dtype(identity)
    try:
        for seq in packed:
            if seq.split not in writers:
                writers[seq.split] = TokenWriter(cache, seq.split, cfg.data.max_length, dtype, c.sequences_per_shard,
                                                 c.sequences_per_chunk)
            writers[seq.split].append({"input_ids": seq.input_ids[None], "position_ids": seq.position_ids[None],
                                       "loss_mask": seq.loss_mask[None], "doc_span": np.asarray([seq.doc_span])})
        bar.close()
        p = packed.packers
        if p["train"].sequences == 0:
            raise DataError(
                f"data.path {cfg.data.path}: no training sequence of {cfg.data.max_length} tokens "
                f"({p['train'].documents} documents, {p['train'].tokens} tokens); use more data or a smaller data.max_length"
            )
        if cfg.data.eval_fraction > 0 and p["eval"].sequences == 0:
            raise DataError(
                f"data.eval_fraction {cfg.data.eval_fraction}: the eval split has {p['eval'].tokens} tokens, "
                f"less than one sequence of {cfg.data.max_length}; raise it, or set it to 0 for no eval split"
            )
        tokens, splits = {}, {}
        for split, writer in writers.items():
            info = writer.finish()
            n = info["sequences"]
            # A tokens-only cache (no teacher) has no teacher shards to write.
            shards = [[a, min(a + c.sequences_per_shard, n)] for a in range(0, n, c.sequences_per_shard)] \
                if identity["teacher"] is not None else []
            splits[split] = {"sequences": n, "tokens": n * cfg.data.max_length, "documents": p[split].documents,
                             "dropped_tokens": p[split].dropped, "trained_positions": p[split].trained_positions,
                             "max_token_id": p[split].max_token_id, "shards": shards}
            tokens[split] = info
        return Plan(identity=identity, splits=splits, tokens=tokens)
    except BaseException:
        bar.close()
        for writer in writers.values():
            writer.abort()
        raise


TOKENIZED = "_tmp/tokenized"


def tokenize_share(cfg: Config, cache: CacheFS, tokenizer, rank: int, world: int) -> int:
    """Under torchrun, every rank tokenizes the document batches b with b % world == rank into
    _tmp/tokenized/, so rank 0 only has to pack (tokenizing is most of the packing time). Every rank reads
    the whole dataset (cheap next to tokenizing it) and returns the number of batches."""
    n = 0
    for n, batch in enumerate(document_batches(cfg.data), start=1):
        if (n - 1) % world == rank:
            docs = tokenize_batch(cfg.data, tokenizer, batch, loss_mask_mode(cfg)).documents
            buf = io.BytesIO()
            np.savez(buf, rows=np.asarray([d.row for d in docs], dtype=np.int64),
                     eval=np.asarray([d.split == "eval" for d in docs], dtype=bool),
                     lengths=np.asarray([len(d.ids) for d in docs], dtype=np.int64),
                     ids=np.asarray([i for d in docs for i in d.ids], dtype=np.int64),
                     targets=np.asarray([t for d in docs for t in d.targets], dtype=bool))
            cache.write_atomic(f"{TOKENIZED}/{n - 1:08d}.npz", buf.getvalue())
    return n


def tokenized_batches(cache: CacheFS, count: int):
    """The batches tokenize_share wrote, in dataset order (a deterministic merge: the same stream as
    tokenizing in one process)."""
    for b in range(count):
        with np.load(io.BytesIO(cache.read_bytes(f"{TOKENIZED}/{b:08d}.npz"))) as z:
            cuts = np.cumsum(z["lengths"])[:-1]
            ids, targets = np.split(z["ids"], cuts), np.split(z["targets"], cuts)
            yield TokenizedBatch([Document(int(r), "eval" if e else "train", i.tolist(), t.tolist())
                                  for r, e, i, t in zip(z["rows"], z["eval"], ids, targets)])


def _save_tokenizer(cache: CacheFS, tokenizer) -> None:
    """The cache carries its tokenizer, so stage two never needs the teacher's path."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                cache.write_atomic(f"tokenizer/{name}", f.read())


def check_free_space(cache: CacheFS, plan: Plan, todo: list[tuple[str, int]]) -> None:
    """Warn (never fail) when the shards still to write may not fit on the cache's disk. The projection is
    their uncompressed size from the plan: an upper bound, since compression only makes them smaller."""
    if not cache.is_local or not todo:
        return
    rows = sum(plan.splits[s]["shards"][i][1] - plan.splits[s]["shards"][i][0] for s, i in todo)
    need = rows * sum(spec.bytes_per_sequence(plan.identity["packing"]["max_length"]) for spec in plan.arrays)
    free = shutil.disk_usage(cache.root).free
    if need > free:
        log.warning("warning: cache.path %s: %s bytes free, but the %d shards still to write may need up to %s bytes "
                    "(uncompressed), so the cache may not fit. If the disk fills, the shard being written is not "
                    "committed: free some space and re-run the same command to resume",
                    cache.url, f"{free:,}", len(todo), f"{need:,}")
