"""The teacher on its device: one batch of token ids in, the arrays a shard stores out.

Only these cross to the host: top-k, lse and the selected layers, never [B, T, V] logits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from sad_pipe.pipeline.config import Config
from sad_pipe.stages.cache_teacher.vocab import chunk_rows, draw, logsumexp, top_k
from sad_pipe.storage.codecs import TopKScheme, encode_samples, encode_topk, position_dtype
from sad_pipe.storage.hidden import KEPT, HiddenBasis, encode_states, kept_positions
from sad_pipe.storage.manifest import hidden_name, topk_scheme


def has_plain_head(model, vocab: int) -> bool:
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


def attends_within_documents(model, vocab: int) -> bool:
    """True when the model's attention follows position_ids that restart per document (transformers' packed-
    sequence path: a block-diagonal causal mask), i.e. the second of two packed documents gets the logits it
    gets alone. Judged against the packed pair without the restart, which must differ far more: a fixed
    tolerance would not suit every dtype."""
    device = model.get_output_embeddings().weight.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 24), generator=g).to(device)
    positions = torch.cat([torch.arange(12), torch.arange(12)]).unsqueeze(0).to(device)
    try:
        with torch.inference_mode():
            alone = model(input_ids=ids[:, 12:], use_cache=False).logits.float()
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 12:].float()
            stream = model(input_ids=ids, use_cache=False).logits[:, 12:].float()
    except Exception:  # noqa: BLE001 - a model that refuses position_ids cannot attend per document
        return False
    apart, crossed = (packed - alone).abs().max(), (stream - alone).abs().max()
    if not torch.isfinite(crossed):  # a teacher producing NaN/Inf: not to be judged here, its shards are refused
        return True
    return bool(apart < 0.05 * crossed)


def sample_generator(seed: int, split: str, sequence: int, form: str) -> torch.Generator:
    """The CPU generator of one sequence's draws for one form: a function of (seed, split, sequence, form)
    only, so a shard's content never depends on the batch size, the number of ranks or the device."""
    key = hashlib.blake2b(f"{seed}/{split}/{sequence}/{form}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))


@dataclass
class TeacherRunner:
    model: torch.nn.Module
    device: torch.device
    scheme: TopKScheme
    temperatures: list[float]
    layers: list[int]
    hidden_dtype: str
    store_target_logprob: bool
    tokens: int  # len(tokenizer): logits of the rows past it (a padded embedding table) are never a token
    targets: dict = field(default_factory=lambda: {"forms": ["topk"]})  # the identity's "targets"
    hidden: dict | None = None  # the identity's "hidden" (storage/hidden.py); None: full states, every position
    basis: HiddenBasis | None = None  # with hidden["rank"]: set once fitted or loaded (stage one's basis step)

    def __post_init__(self):
        self.head = self.model.get_output_embeddings()
        self.vocab = int(self.head.weight.shape[0])
        self.plain_head = has_plain_head(self.model, self.vocab)
        self.forms = set(self.targets["forms"])
        self.draws = {form: name for form, name in (("sampled", "sample"), ("hybrid", "tail")) if form in self.forms}
        # logsumexp at T = 1 gives the target log-prob; computed even when not a cached temperature.
        self.lse_temperatures = self.temperatures + ([] if 1.0 in self.temperatures else [1.0])
        self.chunk = chunk_rows(self.device, self.vocab)
        # [chunk, V] buffers reused by every chunk: on a CPU the page faults of a fresh multi-MB tensor
        # cost more than the exp computed in it.
        self.work = torch.empty(self.chunk, self.vocab, device=self.device)
        plain_linear = isinstance(self.head, torch.nn.Linear) and self.head.bias is None
        self.logit_buffer = (torch.empty(self.chunk, self.vocab, device=self.device, dtype=self.head.weight.dtype)
                             if self.plain_head and plain_linear else None)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, loss_mask: torch.Tensor,
                 split: str = "train", sequences: list[int] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """input_ids, position_ids, loss_mask [B, T] on the device (and, for sampled targets, the split and the
        sequence numbers, which seed the draws) -> (stored arrays [B, T, ...], per-batch stats), all on the
        device. Positions outside loss_mask (never trained: a prompt, a document's last token facing the next
        document) hold zeros in every logit array, which compress to almost nothing."""
        b, t = input_ids.shape
        out = self._forward(input_ids, position_ids)
        rows = (out.last_hidden_state if self.plain_head else out.logits).reshape(b * t, -1)
        uniforms = {form: self._uniforms(split, sequences, t, form) for form in self.draws}
        # The teacher's prediction at position i is scored against token i + 1; the last position
        # of a sequence has no next token in it, so its target log-prob is 0 and it is left out of stats.
        next_ids = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(-1)
        trained = loss_mask.reshape(-1).bool()
        has_next = (torch.arange(t, device=self.device) < t - 1).repeat(b) & trained
        parts = [self._vocab_pass(rows[s:s + self.chunk], next_ids[s:s + self.chunk],
                                  {f: u[s:s + self.chunk] for f, u in uniforms.items()}) for s in range(0, b * t, self.chunk)]
        got = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        vals, ids, lse = got["values"], got["ids"], got["lse"]
        target = torch.where(has_next, got["target"], torch.zeros((), device=self.device))
        n_cached = len(self.temperatures)
        bad = ~(torch.isfinite(vals).all(-1) & torch.isfinite(lse).all(-1))

        logit_arrays = {"lse": lse[:, :n_cached]}
        if {"topk", "hybrid"} & self.forms:
            logit_arrays.update(encode_topk(vals, ids, self.scheme, ids_ascending=True))
        for name in self.draws.values():
            logit_arrays.update(encode_samples(got[name], name, self.scheme))
        if self.store_target_logprob:
            logit_arrays["target_logprob"] = target
        arrays = {k: _zero_where_not(v, trained).reshape(b, t, *v.shape[1:]) for k, v in logit_arrays.items()}
        arrays.update(self._hidden_arrays(out.hidden_states, split, sequences))
        # top-k probability mass at each cached T: how much of the distribution the cache keeps exactly.
        temps = torch.tensor(self.temperatures, device=self.device)
        mass = torch.exp(torch.logsumexp(vals.unsqueeze(1) / temps[:, None], -1) - lse[:, :n_cached])
        top1 = ids.gather(1, vals.argmax(-1, keepdim=True)).squeeze(1) == next_ids
        stats = {"bad_rows": bad.reshape(b, t).any(-1), "topk_mass": (mass * trained.unsqueeze(-1)).sum(0),
                 "positions": trained.sum(), "target_nll": (-target * has_next).sum(),
                 "target_top1": (top1 & has_next).sum(), "target_count": has_next.sum()}
        for name in self.draws.values():  # distinct ids per position: what the draws cost
            stats[f"{name}_distinct"] = ((arrays[f"{name}_counts"] > 0).sum(-1) * loss_mask).sum()
        return arrays, stats

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor):
        # position_ids restarting per document make transformers mask attention per document (its packed-
        # sequence path); running 0..T-1 (packing stream) they are the default. transformers 5 records hidden
        # states with forward hooks and, given a list of indices, keeps only those.
        model = self.model.base_model if self.plain_head else self.model
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                     output_hidden_states=list(self.layers) or False)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """The selected layers' raw states {layer: [B, T, D]} on the device (what the basis is fitted on)."""
        out = self._forward(input_ids, position_ids)
        return {layer: out.hidden_states[layer] for layer in self.layers}

    def _hidden_arrays(self, states, split: str, sequences: list[int] | None) -> dict[str, torch.Tensor]:
        """hidden_<L> (+ _scale) of every cached layer: at the kept positions, as basis coefficients when the
        cache is low-rank, encoded as hidden_dtype; and kept_positions when not every position is kept."""
        if not self.layers:
            return {}
        positions = (self.hidden or {}).get("positions", "all")
        t = states[self.layers[0]].shape[1]
        keep = None
        arrays = {}
        if positions != "all":
            if sequences is None:
                raise ValueError("hidden_positions other than all need the split and sequence numbers of the batch")
            kept = np.stack([kept_positions(positions, t, split, seq) for seq in sequences])
            keep = torch.from_numpy(kept).to(self.device)
            arrays[KEPT] = torch.from_numpy(kept.astype(position_dtype(t)))
        rank = (self.hidden or {}).get("rank")
        if rank and self.basis is None:
            raise ValueError("a low-rank cache's runner needs its basis (fit_basis or read_basis) before it runs")
        for layer in self.layers:
            enc = encode_states(states[layer], self.hidden_dtype, self.basis if rank else None, layer, keep)
            arrays[hidden_name(layer)] = enc["values"]
            if "scale" in enc:
                arrays[hidden_name(layer) + "_scale"] = enc["scale"]
        return arrays

    def _uniforms(self, split: str, sequences: list[int] | None, t: int, form: str) -> torch.Tensor:
        """[B*T, N] uniforms in [0, 1), ascending per position (so the draws come out sorted), from each
        sequence's own CPU generator."""
        if sequences is None:
            raise ValueError("sampled targets need the split and sequence numbers of the batch")
        n = self.targets["samples"]
        u = torch.cat([torch.rand(t, n, generator=sample_generator(self.targets["seed"], split, seq, form))
                       for seq in sequences])
        return u.sort(-1).values.to(self.device)

    def _vocab_pass(self, rows: torch.Tensor, next_ids: torch.Tensor, uniforms: dict[str, torch.Tensor]) -> dict:
        """One chunk of positions: top-k values and ids, lse per T, log-prob of the next token, and the
        draws of each sampled form."""
        if self.logit_buffer is not None:  # what the Linear head computes, into the reused buffer
            f = torch.mm(rows, self.head.weight.t(), out=self.logit_buffer[:len(rows)]).float()
        else:
            f = (self.head(rows) if self.plain_head else rows).float()
        if self.tokens < self.vocab:
            f[:, self.tokens:] = -torch.inf
        vals, ids = top_k(f, self.scheme.k)
        fmax = vals.amax(-1)
        work = self.work[:len(rows)]
        lse = logsumexp(f, fmax, self.lse_temperatures, work)
        lse1 = lse[:, self.lse_temperatures.index(1.0)]
        out = {"values": vals, "ids": ids, "lse": lse, "target": f.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - lse1}
        for form, name in self.draws.items():
            out[name] = draw(f, fmax, self.targets["temperature"], uniforms[form], work,
                             exclude=ids if form == "hybrid" else None)
        return out

def make_runner(cfg: Config, teacher, device: torch.device, identity: dict) -> TeacherRunner | None:
    """The runner stage one (and its dry run) uses for this config; None for a tokens-only cache."""
    if teacher is None:
        return None
    return TeacherRunner(teacher, device, topk_scheme(identity), list(cfg.cache.temperatures), list(cfg.teacher.layers),
                         cfg.cache.hidden_dtype, cfg.cache.store_target_logprob, identity["tokenizer"]["size"],
                         identity["targets"], identity.get("hidden"))


def _zero_where_not(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [N, ...] with rows where keep [N] is False set to 0."""
    return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype, device=x.device))
