"""Stage one: run the teacher once over the data and fill the cache.

    run(config) -> summary
      1. tokenizer + teacher; the cache identity (teacher, tokenizer, data, packing, k, layers, dtypes)
      2. plan: reuse the existing one (same identity) or tokenize + pack into tokens/ and plan.json
      3. every uncommitted shard: teacher forward -> top-k, logsumexp, hidden states on the device ->
         host -> encode, write and commit in a background thread, behind the next forward
      4. finalize: per-sequence index, then manifest.json (last, only when every shard is committed)

Re-running the same command resumes: committed shards are skipped, leftovers are deleted first.
Without a teacher (`teacher.model: null`) the cache holds tokens only, which is how the demo trains
its teacher with the same train-student path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from sad_pipe.errors import CacheError, ConfigError, DataError, SadPipeError
from sad_pipe.pipeline import distributed
from sad_pipe.pipeline.config import Config
from sad_pipe.pipeline.data import PackedDocuments, dataset_fingerprint
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
from sad_pipe.storage.codecs import TopKScheme, encode_hidden, encode_topk
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.manifest import (
    Plan,
    cache_id,
    check_identity,
    hidden_name,
    missing_shards,
    read_commits,
    read_plan,
    topk_scheme,
)
from sad_pipe.storage.verify import collect_garbage, compressed_bytes_per_token
from sad_pipe.storage.writer import ShardWriter, TokenWriter, create_plan, finalize

log = logging.getLogger(__name__)


def chunk_rows(device: torch.device, vocab: int) -> int:
    """Positions per chunk of the vocabulary pass: the head's matmul into a reused [rows, V] buffer,
    then top-k and logsumexp reading it. On a GPU the chunk only bounds memory (256 MB). On a CPU the
    matmul needs rows: measured on 2 cores, a 42-row chunk of a V=49152 head took 2.2 s per 2048
    positions where one matmul took 0.9 s, and 512-1024 rows were the fastest for the whole pass at
    V=8192 and 49152 (the buffer stays reused, so no page faults either)."""
    if device.type == "cpu":
        return max(512, (32 << 20) // (4 * vocab))
    return max(1, (256 << 20) // (4 * vocab))


class TeacherOutputError(SadPipeError):
    """The teacher produced NaN/Inf; the shard is refused."""


# -- the teacher on the device ----------------------------------------------------------------------

def _largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [N, k] of the k largest entries of each row of x [N, M] (CPU), ascending."""
    # torch.topk on a CPU is a scalar selection per row at ~10 ns per entry; numpy's introselect does
    # the same job 2.5-3x faster (measured: 6 vs 16 us for a row of 1365), and its SIMD sort puts the
    # k indices in order for ~0.2 us a row, where the codec's torch sort costs ~4 us.
    a = x.numpy()
    return torch.from_numpy(np.sort(np.argpartition(a, a.shape[1] - k, axis=1)[:, a.shape[1] - k:], axis=1))


def top_k(f: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest entries of each row of f [N, V], ids ascending (the order the
    codec stores); exact. Ties at the k-th value are broken arbitrarily, as torch.topk does.

    A selection over V per row costs as much as a small teacher's whole output layer on a CPU. Cut
    each row into V/g strided blocks of g entries: the k largest entries lie in the k blocks with the
    largest maxima (a block ranked below them has k maxima above its own), so one vectorised max pass
    and two selections over ~sqrt(kV) entries each replace the selection over V. Block j holds columns
    j, j + width, ..., so with the chosen blocks ascending the candidate columns come out ascending too.
    GPUs select fast enough as is.
    """
    n, vocab = f.shape
    g = round(math.sqrt(vocab / k))
    if f.device.type != "cpu" or g < 2:
        values, ids = f.topk(k, dim=-1, sorted=False)
        ids, order = ids.sort(dim=-1)
        return values.gather(1, order), ids
    width = vocab // g
    block_max = f[:, :g * width].unflatten(1, (g, width)).amax(1)
    blocks = _largest(block_max, k)
    candidates = (blocks.unsqueeze(1) + torch.arange(0, g * width, width).view(1, g, 1)).flatten(1)
    if vocab > g * width:  # the few columns past the last whole block are always candidates
        candidates = torch.cat([candidates, torch.arange(g * width, vocab).expand(n, -1)], dim=1)
    values = f.gather(1, candidates)
    pick = _largest(values, k)
    return values.gather(1, pick), candidates.gather(1, pick)


def logsumexp(f: torch.Tensor, fmax: torch.Tensor, temperatures: list[float], work: torch.Tensor) -> torch.Tensor:
    """logsumexp(f / T) for each T -> [N, len(temperatures)], given the row maxima fmax [N] and a
    scratch tensor `work` shaped like f. A NaN or +inf anywhere in a row makes that row's results NaN.

    work holds exp((f - max) / T) for one T at a time, highest T first, in one fused pass; halving T
    squares it, so the sum at T/2 is a squared norm (one read) where a new exp would cost two passes
    and the exp itself."""
    sums, current = {}, None
    for t in sorted(set(temperatures), reverse=True):
        if current is not None and current == 2 * t:
            if t / 2 in temperatures:  # still needed as the base of the next T
                sums[t] = work.square_().sum(-1)
            else:
                sums[t] = torch.linalg.vector_norm(work, dim=-1).square_()
        else:
            torch.add((fmax / -t).unsqueeze(-1), f, alpha=1.0 / t, out=work).exp_()
            sums[t] = work.sum(-1)
        current = t
    scale = torch.tensor(temperatures, device=f.device)
    return torch.stack([sums[t] for t in temperatures], -1).log_() + fmax.unsqueeze(-1) / scale


def _plain_head(model, vocab: int) -> bool:
    """True when the logits are output_embeddings(base_model(...).last_hidden_state) and nothing else
    (no soft-capping, no scaling). Then the runner projects chunk by chunk and never holds [B*T, V]
    logits; otherwise it asks the model for its logits."""
    base, head = getattr(model, "base_model", model), model.get_output_embeddings()
    if base is model or head is None:
        return False
    ids = (torch.arange(16, device=head.weight.device) % vocab).unsqueeze(0)
    try:
        with torch.inference_mode():
            full = model(input_ids=ids, use_cache=False).logits
            mine = head(base(input_ids=ids, use_cache=False).last_hidden_state)
    except Exception:  # noqa: BLE001 - any surprise means: use the model's own logits
        return False
    return torch.equal(full.float(), mine.float())


@dataclass
class TeacherRunner:
    model: torch.nn.Module
    device: torch.device
    scheme: TopKScheme
    temperatures: list[float]
    layers: list[int]
    hidden_dtype: str
    store_target_logprob: bool

    def __post_init__(self):
        self.head = self.model.get_output_embeddings()
        self.vocab = int(self.head.weight.shape[0])
        self.fused = _plain_head(self.model, self.vocab)
        # logsumexp at T = 1 gives the target log-prob; computed even when not a cached temperature.
        self.lse_temperatures = self.temperatures + ([] if 1.0 in self.temperatures else [1.0])
        self.chunk = chunk_rows(self.device, self.vocab)
        # [chunk, V] buffers reused by every chunk: on a CPU the page faults of a fresh multi-MB tensor
        # cost more than the exp computed in it.
        self.work = torch.empty(self.chunk, self.vocab, device=self.device)
        plain_linear = isinstance(self.head, torch.nn.Linear) and self.head.bias is None
        self.logit_buffer = (torch.empty(self.chunk, self.vocab, device=self.device, dtype=self.head.weight.dtype)
                             if self.fused and plain_linear else None)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """input_ids [B, T] on the device -> (stored arrays [B, T, ...], per-batch stats), all on the device.

        Only these cross to the host: top-k, lse and the selected layers, never [B, T, V] logits."""
        b, t = input_ids.shape
        # transformers 5 records hidden states with forward hooks (utils/output_capturing) and, given a
        # list of indices, keeps only those: the other layers' outputs are never held.
        hidden = list(self.layers) or False
        if self.fused:
            out = self.model.base_model(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
            rows = out.last_hidden_state.reshape(b * t, -1)
        else:
            out = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
            rows = out.logits.reshape(b * t, -1)
        # The teacher's prediction at position i is scored against token i + 1; the last position
        # of a sequence has no next token in it, so its target log-prob is 0 and it is left out of stats.
        next_ids = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(-1)
        has_next = (torch.arange(t, device=self.device) < t - 1).repeat(b)
        parts = [self._vocab_pass(rows[s:s + self.chunk], next_ids[s:s + self.chunk]) for s in range(0, b * t, self.chunk)]
        vals, ids, lse, target = (torch.cat(p) for p in zip(*parts))
        target = torch.where(has_next, target, torch.zeros((), device=self.device))
        n_cached = len(self.temperatures)
        bad = ~(torch.isfinite(vals).all(-1) & torch.isfinite(lse).all(-1))

        arrays = {k: v.reshape(b, t, *v.shape[1:]) for k, v in encode_topk(vals, ids, self.scheme, ids_ascending=True).items()}
        arrays["lse"] = lse[:, :n_cached].reshape(b, t, -1)
        if self.store_target_logprob:
            arrays["target_logprob"] = target.reshape(b, t)
        for layer in self.layers:
            enc = encode_hidden(out.hidden_states[layer].reshape(b * t, -1), self.hidden_dtype)
            arrays[hidden_name(layer)] = enc["values"].reshape(b, t, -1)
            if "scale" in enc:
                arrays[hidden_name(layer) + "_scale"] = enc["scale"].reshape(b, t)
        # top-k probability mass at each cached T: how much of the distribution the cache keeps exactly.
        temps = torch.tensor(self.temperatures, device=self.device)
        mass = torch.exp(torch.logsumexp(vals.unsqueeze(1) / temps[:, None], -1) - lse[:, :n_cached])
        top1 = ids.gather(1, vals.argmax(-1, keepdim=True)).squeeze(1) == next_ids
        stats = {"bad_rows": bad.reshape(b, t).any(-1), "topk_mass": mass.sum(0),
                 "target_nll": (-target * has_next).sum(), "target_top1": (top1 & has_next).sum(),
                 "target_count": has_next.sum()}
        return arrays, stats

    def _vocab_pass(self, rows: torch.Tensor, next_ids: torch.Tensor):
        """One chunk of positions: (top-k values, top-k ids, lse per T, log-prob of the next token)."""
        if self.logit_buffer is not None:  # what the Linear head computes, into the reused buffer
            f = torch.mm(rows, self.head.weight.t(), out=self.logit_buffer[:len(rows)]).float()
        else:
            f = (self.head(rows) if self.fused else rows).float()
        vals, ids = top_k(f, self.scheme.k)
        lse = logsumexp(f, vals.amax(-1), self.lse_temperatures, self.work[:len(rows)])
        lse1 = lse[:, self.lse_temperatures.index(1.0)]
        return vals, ids, lse, f.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - lse1


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Device -> host. On CUDA, into pinned buffers without blocking; the caller records an event."""
    if next(iter(tensors.values())).device.type != "cuda":
        return tensors
    host = {}
    for k, v in tensors.items():
        buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        host[k] = buf.copy_(v, non_blocking=True)
    return host


# -- writing shards ---------------------------------------------------------------------------------------

class ShardSink:
    """Takes finished batches in order, fills their shard and commits it when full, in a thread behind
    a bounded queue: compression and disk I/O overlap the teacher's next forward. On a GPU that is
    free; on a CPU the writer soaks up the cores a teacher's thread pool leaves idle at its barriers
    and Python glue (measured: in line, writing added 0.12-0.33x of the bare forward; behind the
    queue 0.01-0.07x left unhidden, plus ~0.07x of the teacher's own time lost to the shared cores).
    A writer process instead of the thread measured no better (1.17x vs 1.16x of the bare forward,
    5 interleaved runs): the cost is CPU time, not the GIL, so it stays a thread.
    When writing falls behind, the teacher waits instead of host memory growing.

    A shard with any non-finite teacher output is refused when its last batch arrives, naming every
    bad sequence in it. An error in the thread discards that shard and is raised in the caller at its
    next call.
    """

    def __init__(self, temperatures: list[float], depth: int):
        self.temperatures = temperatures
        self.committed: list[dict] = []
        self.bytes = 0
        self._bad: list[int] = []
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="sad-pipe-writer", daemon=True)
        self.thread.start()

    def submit(self, writer: ShardWriter, arrays, stats, rows: np.ndarray) -> None:
        self._raise()
        event = None
        if next(iter(arrays.values())).device.type == "cuda":
            arrays, stats = _to_host(arrays), _to_host(stats)
            event = torch.cuda.Event()
            event.record()
        self.queue.put((writer, arrays, stats, rows, event))

    def discard(self, writer: ShardWriter) -> None:
        """Give up the shard in progress (an error or Ctrl-C in the caller)."""
        self.queue.put((writer, None, None, None, None))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            writer, arrays, stats, rows, event = item
            if self.error is not None or arrays is None:  # after an error, or a shard given up (Ctrl-C)
                self._abort(writer)
                continue
            try:
                self._consume(writer, arrays, stats, rows, event)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                self.error = exc

    def _abort(self, writer: ShardWriter) -> None:
        self._bad = []
        writer.abort()

    def _consume(self, writer: ShardWriter, arrays, stats, rows, event) -> None:
        try:
            if event is not None:
                event.synchronize()
            bad = stats.pop("bad_rows").cpu().numpy()
            self._bad += [int(r) for r in np.asarray(rows)[bad]]
            mass = stats.pop("topk_mass").cpu().numpy()
            flat = {k: float(v) for k, v in stats.items()}
            flat.update({f"topk_mass_T{t:g}": float(m) for t, m in zip(self.temperatures, mass)})
            writer.write({k: v.numpy() for k, v in arrays.items()}, flat)
            if writer.filled < writer.rows:
                return
            bad, self._bad = self._bad, []
            if bad:
                names = ", ".join(map(str, bad[:20])) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
                raise TeacherOutputError(
                    f"teacher produced NaN/Inf logits for {writer.split} sequences [{names}] (shard {writer.shard}); "
                    "that shard was not committed. float16 overflows on some models: try teacher.dtype bfloat16 or float32"
                )
            record = writer.finish()
        except BaseException:
            self._abort(writer)
            raise
        if record is not None:
            self.committed.append(record)
            self.bytes += sum(f["size"] for f in record["files"].values())


# -- identity and plan --------------------------------------------------------------------------------

def _identity(cfg: Config, tokenizer, teacher, tokenizer_name: str) -> dict:
    c, t = cfg.cache, cfg.teacher
    return {
        "teacher": None if teacher is None else teacher_identity(teacher, t.model, t.revision),
        "tokenizer": {"name": tokenizer_name, "sha256": tokenizer_fingerprint(tokenizer), "size": len(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id},
        "dataset": dataset_fingerprint(cfg.data),
        "packing": {"max_length": cfg.data.max_length, "separator": "eos"},
        "top_k": c.top_k if teacher is not None else 0,
        "temperatures": list(c.temperatures) if teacher is not None else [],
        "layers": list(t.layers) if teacher is not None else [],
        "values": c.values, "hidden_dtype": c.hidden_dtype,
        "store_target_logprob": c.store_target_logprob and teacher is not None,
        "sequences_per_shard": c.sequences_per_shard, "sequences_per_chunk": c.sequences_per_chunk,
    }


def _check_teacher(cfg: Config, teacher, tokenizer) -> None:
    problems = []
    n_layers, vocab = num_layers_of(teacher), vocab_size_of(teacher)
    bad = [i for i in cfg.teacher.layers if not 0 <= i <= n_layers]
    if bad:
        problems.append(f"teacher.layers {bad}: out of range; this teacher has hidden states 0..{n_layers}")
    if cfg.cache.top_k > vocab:
        problems.append(f"cache.top_k {cfg.cache.top_k}: larger than the teacher's vocabulary ({vocab})")
    context = max_positions_of(teacher)
    if context is not None and cfg.data.max_length > context:
        problems.append(f"data.max_length {cfg.data.max_length}: longer than the teacher's context ({context})")
    if len(tokenizer) > vocab:
        problems.append(f"tokenizer has {len(tokenizer)} tokens but the teacher only {vocab} logits: not this teacher's tokenizer")
    if problems:
        raise ConfigError(problems)


def _id_dtype(identity: dict) -> np.dtype:
    vocab = max(identity["tokenizer"]["size"], (identity["teacher"] or {}).get("vocab_size", 0))
    return np.dtype(np.uint16) if vocab <= 65536 else np.dtype(np.uint32)


def _pack(cfg: Config, cache: CacheFS, tokenizer, identity: dict) -> Plan:
    """Tokenize and pack every document into tokens/<split>, then describe the shards. Nothing is
    visible until plan.json exists; a failure here leaves only _tmp/ garbage."""
    c = cfg.cache
    writers: dict[str, TokenWriter] = {}
    bar = tqdm(desc="tokenize+pack", unit=" docs", dynamic_ncols=True)
    packed = PackedDocuments(cfg.data, tokenizer, on_documents=bar.update)
    id_dtype = _id_dtype(identity)
    try:
        for split, seq, span in packed:
            if split not in writers:
                writers[split] = TokenWriter(cache, split, cfg.data.max_length, id_dtype, c.sequences_per_shard, c.sequences_per_chunk)
            writers[split].append(seq[None].astype(id_dtype), np.asarray([span], dtype=np.int64))
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
                             "dropped_tokens": p[split].dropped, "shards": shards}
            tokens[split] = info
        return Plan(identity=identity, splits=splits, tokens=tokens)
    except BaseException:
        bar.close()
        for writer in writers.values():
            writer.abort()
        raise


# -- the run ----------------------------------------------------------------------------------------------

def _fill(cfg: Config, cache: CacheFS, plan: Plan, runner: TeacherRunner, todo: list[tuple[str, int]], rank: int) -> dict:
    """Run the teacher over the planned shards in `todo`; returns timing figures."""
    import zarr

    t_len = plan.identity["packing"]["max_length"]
    total = sum(plan.splits[s]["shards"][i][1] - plan.splits[s]["shards"][i][0] for s, i in todo)
    token_arrays = {s: zarr.open_array(store=cache.zarr_store(f"{t['dir']}/input_ids", read_only=True), mode="r")
                    for s, t in plan.tokens.items()}
    sink = ShardSink(runner.temperatures, cfg.cache.queue_depth)
    bar = tqdm(total=total, desc=f"teacher{f' rank {rank}' if distributed.world_size() > 1 else ''}", unit=" seq",
               dynamic_ncols=True, position=rank)
    forward_s, done_tokens, start = 0.0, 0, time.perf_counter()
    current = None
    try:
        for split, shard in todo:
            a, b = plan.splits[split]["shards"][shard]
            current = ShardWriter(cache, plan, split, shard, rank=rank)
            ids_all = token_arrays[split][a:b].astype(np.int64)
            for s in range(0, b - a, cfg.teacher.batch_size):
                batch = torch.from_numpy(ids_all[s:s + cfg.teacher.batch_size]).to(runner.device, non_blocking=True)
                t0 = time.perf_counter()
                arrays, stats = runner(batch)
                forward_s += time.perf_counter() - t0
                sink.submit(current, arrays, stats, np.arange(a + s, a + s + len(batch)))
                done_tokens += len(batch) * t_len
                bar.update(len(batch))
                committed_tokens = sum(r["stats"]["tokens"] for r in sink.committed)
                bar.set_postfix_str(f"{done_tokens / (time.perf_counter() - start):,.0f} tok/s"
                                    + (f", {sink.bytes / committed_tokens:,.0f} B/token" if committed_tokens else ""))
            current = None  # fully submitted: the sink commits it
        sink.close()
    except BaseException:
        if current is not None:  # Ctrl-C or an error mid-shard: that shard is discarded, earlier ones still commit
            sink.discard(current)
        try:
            sink.close()
        except TeacherOutputError as exc:  # the writer's own error explains more than the interrupt
            raise exc from None
        except BaseException as exc:  # noqa: BLE001 - the original error is the one to report
            log.debug("writer error after interrupt: %s", exc)
        raise
    finally:
        bar.close()
    return {"forward_seconds": forward_s, "fill_seconds": time.perf_counter() - start, "tokens": done_tokens,
            "committed": len(sink.committed)}


def _summary(cache: CacheFS, plan: Plan, figures: dict) -> dict:
    commits = read_commits(cache)
    per_array: dict[str, int] = {}
    stats: dict[str, dict[str, float]] = {s: {} for s in plan.splits}
    for (split, _), record in commits.items():
        for name, info in record["files"].items():
            array = name.split("/", 1)[0] if "/" in name else "metadata"  # the group's own zarr.json
            per_array[array] = per_array.get(array, 0) + info["size"]
        for k, v in record["stats"].items():
            stats[split][k] = stats[split].get(k, 0.0) + v
    token_bytes = sum(f["size"] for t in plan.tokens.values() for f in t["files"].values())
    tokens = sum(s["tokens"] for s in plan.splits.values())
    total = sum(per_array.values()) + token_bytes
    out = {
        "sequences": {s: v["sequences"] for s, v in plan.splits.items()},
        "tokens": tokens, "shards": len(commits), "bytes": total, "bytes_per_token": total / tokens,
        "bytes_per_token_by_array": {"input_ids": token_bytes / tokens, **{k: v / tokens for k, v in sorted(per_array.items())}},
        **figures,
    }
    for split, st in stats.items():
        if st.get("target_count"):
            out[f"teacher_{split}_ce"] = st["target_nll"] / st["target_count"]
            out[f"teacher_{split}_top1"] = st["target_top1"] / st["target_count"]
        for t in plan.identity["temperatures"]:
            if f"topk_mass_T{t:g}" in st:
                out.setdefault("topk_mass", {}).setdefault(f"T{t:g}", 0.0)
                out["topk_mass"][f"T{t:g}"] += st[f"topk_mass_T{t:g}"] / tokens
    return out


def load_teacher_for(cfg: Config):
    """(tokenizer, teacher or None, device), checked against the config. Shared with online KD."""
    tok_name = cfg.data.tokenizer or cfg.teacher.model
    if tok_name is None:
        raise ConfigError("data.tokenizer: required when teacher.model is null (a tokens-only cache needs a tokenizer)")
    if cfg.teacher.model is not None:  # before the tokenizer, which usually comes from the same path
        require_local_path(cfg.teacher.model, "teacher.model")
    tokenizer = load_tokenizer(tok_name, revision=None if cfg.data.tokenizer else cfg.teacher.revision,
                               trust_remote_code=cfg.teacher.trust_remote_code)
    if cfg.teacher.model is None:
        return tokenizer, None, torch.device("cpu"), tok_name
    device = resolve_device(cfg.teacher.device)
    teacher = load_causal_lm(cfg.teacher.model, revision=cfg.teacher.revision, dtype=resolve_dtype(cfg.teacher.dtype, device),
                             device=device, trust_remote_code=cfg.teacher.trust_remote_code, what="teacher")
    teacher.eval()
    _check_teacher(cfg, teacher, tokenizer)
    return tokenizer, teacher, device, tok_name


def _runner(cfg: Config, teacher, device, identity) -> TeacherRunner | None:
    if teacher is None:
        return None
    return TeacherRunner(teacher, device, topk_scheme(identity), list(cfg.cache.temperatures), list(cfg.teacher.layers),
                         cfg.cache.hidden_dtype, cfg.cache.store_target_logprob)


def _open_cache(cfg: Config, identity: dict) -> tuple[CacheFS, Plan | None]:
    cache = CacheFS(cfg.cache.path)
    if cache.is_local and os.path.isfile(cache.root):
        raise ConfigError(f"cache.path {cfg.cache.path}: is a file, expected a directory")
    plan = read_plan(cache)
    if plan is not None:
        check_identity(plan.identity, identity, cfg.cache.path)
    # What a run killed before creating plan.json leaves (gc removes it, the tokenizer is rewritten).
    elif [n for n in cache.listdir("") if n not in ("_tmp", "tokens", "commits", "shards", "tokenizer")
          and not n.endswith(".partial")]:
        raise ConfigError(f"cache.path {cfg.cache.path}: directory is not empty and holds no sad-pipe cache; "
                          "choose a new or empty directory")
    return cache, plan


def run(cfg: Config, *, dry_run: bool = False) -> dict:
    """Stage one. Returns the cache summary (also saved in the manifest)."""
    cfg.require("data.path", "cache.path")
    start = time.perf_counter()
    tokenizer, teacher, device, tok_name = load_teacher_for(cfg)
    identity = _identity(cfg, tokenizer, teacher, tok_name)
    if dry_run:
        return _dry_run(cfg, tokenizer, teacher, device, identity)
    rank, world = distributed.rank(), distributed.world_size()
    cache, plan = _open_cache(cfg, identity)
    if cache.exists("manifest.json") and plan is not None:
        log.info("cache %s is complete; nothing to do", cfg.cache.path)
        return {**cache.read_json("manifest.json")["summary"], "already_complete": True}
    if rank == 0:
        collect_garbage(cache)  # leftovers of an earlier crash; no other writer runs before the barrier
        if plan is None:
            plan = _create(cfg, cache, tokenizer, identity)
        if not cache.exists("config.json"):  # verify --repair reruns it; a kill may come right after plan.json
            cache.write_atomic("config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    distributed.barrier()
    plan = read_plan(cache)
    todo = [(s, i) for s, i in missing_shards(plan, read_commits(cache)) if i % world == rank]
    figures = {"forward_seconds": 0.0, "fill_seconds": 0.0, "tokens": 0, "committed": 0}
    runner = _runner(cfg, teacher, device, identity)
    if rank == 0 and runner is not None:
        _check_free_space(cache, plan, missing_shards(plan, read_commits(cache)))
    if runner is not None and todo:
        log.info("teacher: %d shards to write (%d already committed)", len(todo),
                 sum(len(v["shards"]) for v in plan.splits.values()) - len(missing_shards(plan, read_commits(cache))))
        figures = _fill(cfg, cache, plan, runner, todo, rank)
    figures = distributed.sum_figures(figures)
    distributed.barrier()
    wall = time.perf_counter() - start
    summary = _summary(cache, plan, {
        "wall_seconds": wall, "teacher_forward_seconds": figures["forward_seconds"], "fill_seconds": figures["fill_seconds"],
        "teacher_tokens_per_second": figures["tokens"] / figures["forward_seconds"] if figures["forward_seconds"] else None,
        "cache_id": cache_id(plan.identity),
    })
    if rank == 0:
        missing = missing_shards(plan, read_commits(cache))
        if missing:
            raise CacheError(f"{len(missing)} shards are still missing (another rank failed?); re-run to finish")
        finalize(cache, summary)
    distributed.barrier()
    return summary


def _check_free_space(cache: CacheFS, plan: Plan, todo: list[tuple[str, int]]) -> None:
    """Warn (never fail) when the shards still to write may not fit on the cache's disk. The projection is
    their uncompressed size from the plan: an upper bound, since compression only makes them smaller."""
    if not cache.is_local or not todo:
        return
    rows = sum(plan.splits[s]["shards"][i][1] - plan.splits[s]["shards"][i][0] for s, i in todo)
    need = rows * plan.identity["packing"]["max_length"] * sum(spec.bytes_per_token for spec in plan.arrays)
    free = shutil.disk_usage(cache.root).free
    if need > free:
        log.warning("warning: cache.path %s: %s bytes free, but the %d shards still to write may need up to %s bytes "
                    "(uncompressed), so the cache may not fit. If the disk fills, the shard being written is not "
                    "committed: free some space and re-run the same command to resume",
                    cache.url, f"{free:,}", len(todo), f"{need:,}")


def _create(cfg: Config, cache: CacheFS, tokenizer, identity: dict) -> Plan:
    created_root = not cache.exists("")
    try:
        plan = _pack(cfg, cache, tokenizer, identity)
        _save_tokenizer(cache, tokenizer)  # always: files a killed earlier attempt left may be partial or another's
        return create_plan(cache, plan)
    except BaseException:
        if created_root and cache.is_local and not cache.exists("plan.json"):
            shutil.rmtree(cache.root, ignore_errors=True)  # nothing was committed: leave no trace
        raise


def _save_tokenizer(cache: CacheFS, tokenizer) -> None:
    """The cache carries its tokenizer, so stage two never needs the teacher's path."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                cache.write_atomic(f"tokenizer/{name}", f.read())


# -- dry run ----------------------------------------------------------------------------------------------

SAMPLE_SEQUENCES = 8


def _dry_run(cfg: Config, tokenizer, teacher, device, identity: dict) -> dict:
    """Count sequences and tokens, then project the cache size per array from a small teacher sample."""
    packed = PackedDocuments(cfg.data, tokenizer)
    sample = []
    counts = {"train": 0, "eval": 0}
    for split, seq, _ in tqdm(packed, desc="tokenize+pack (dry run)", unit=" seq", dynamic_ncols=True):
        counts[split] += 1
        if len(sample) < SAMPLE_SEQUENCES:
            sample.append(seq)
    tokens = {s: n * cfg.data.max_length for s, n in counts.items()}
    total_tokens = sum(tokens.values())
    per_token = {"input_ids": float(_id_dtype(identity).itemsize)}  # uncompressed: an upper bound
    if teacher is not None and sample:
        runner = _runner(cfg, teacher, device, identity)
        arrays, _ = runner(torch.from_numpy(np.stack(sample)).to(device))
        host = {k: v.cpu().numpy() for k, v in arrays.items()}
        specs = Plan(identity=identity, splits={}).arrays
        per_token.update(compressed_bytes_per_token(host, specs, identity["sequences_per_chunk"]))
    projected = {name: per * total_tokens for name, per in per_token.items()}
    return {
        "dry_run": True, "sequences": counts, "tokens": tokens,
        "documents": {s: p.documents for s, p in packed.packers.items()},
        "projected_bytes_per_token": {**per_token, "total": sum(per_token.values())},
        "projected_bytes": {**projected, "total": sum(projected.values())},
    }
