"""Benchmark: what hidden states cost per storage mode, and how faithful each is, at a real width.

A Llama-shaped teacher of width 1024 (teachers.WIDE: 2 layers, V=2048, trained 200 steps on the stdlib
corpus, so its states have a trained spectrum; the demo's 256 is too narrow to show what a real width
costs). Each mode goes through the project's own path: the basis fit of stage one (storage/hidden.py:
float64 covariance of the states of the first FIT_TOKENS tokens of the teacher's *training* text, document
starts left out, eigh, top R), `hidden.encode_states` (the runner's encoding), the writer's zarr group with
a real shard's compressors (`writer.write_group`), a read back and decode. Reconstruction is measured on
held-out text the basis never saw:

    B/token/layer  compressed bytes of hidden_<L> (+ _scale, + kept_positions) over every token, from the
                   written zarr files
    ÷ bf16         that ÷ the full-width bf16 row's bytes (the default cache.hidden_dtype)
    rel. error     ||h - h'|| / ||h|| over the stored positions (h' = mu + U z decoded)
    cosine         mean and minimum per-position cosine(h, h') over the stored positions
    var. expl.     share of the fit sample's variance the rank holds (what inspect reports)
Position subsampling stores fewer positions: its errors are over those it keeps (the others have no state).
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from sad_pipe.bench.measure import Context, Figure, Result, Table
from sad_pipe.bench.teachers import TINY, WIDE, held_out_sequences
from sad_pipe.storage.codecs import decode_hidden
from sad_pipe.storage.hidden import (
    CovarianceAccumulator,
    HiddenBasis,
    encode_states,
    kept_count,
    kept_positions,
    mode_name,
    reconstruction_error,
)
from sad_pipe.storage.manifest import hidden_name, shard_arrays

SIZES = {"full": {"teacher": WIDE, "fit_sequences": 512, "eval_sequences": 64, "batch": 8, "ranks": (32, 64, 128, 256)},
         "quick": {"teacher": TINY, "fit_sequences": 32, "eval_sequences": 8, "batch": 4, "ranks": (4, 8)}}
POSITIONS = [{"every": 4}, {"random": 0.25, "seed": 0}]
TARGET_RATIO = 10.0  # >= 10x fewer hidden-state bytes per token than bf16 at width >= 1024 ...
CHOSEN = "rank64-int8"  # ... for the mode the README recommends at real widths (cache.hidden_rank 64, int8)


def _states(ctx: Context, teacher, path, sequences: int, batch: int, layers: list[int]):
    """{layer: [n, T, D] float32} and position ids [n, T] of the first `sequences` packed sequences of a jsonl."""
    from sad_pipe.bench.assets import quiet
    from sad_pipe.pipeline.models import load_causal_lm, resolve_dtype

    device = torch.device(ctx.device)
    with quiet():
        model = load_causal_lm(str(teacher.model), revision=None, dtype=resolve_dtype("float32", device),
                               device=device, trust_remote_code=False, what="teacher").eval()
        seqs = held_out_sequences(teacher.tokenizer, path, sequences, teacher.recipe.max_length)
    out = {layer: [] for layer in layers}
    with torch.inference_mode():
        for s in range(0, len(seqs), batch):
            hs = model(input_ids=seqs[s:s + batch].to(device), use_cache=False, output_hidden_states=True).hidden_states
            for layer in layers:
                out[layer].append(hs[layer].float().cpu())
    positions = torch.arange(seqs.shape[1]).expand(seqs.shape[0], -1)  # one stream per sequence
    return {layer: torch.cat(v) for layer, v in out.items()}, positions


def _fit(states: dict, positions: torch.Tensor, rank: int) -> HiddenBasis:
    acc = {}
    for layer, h in states.items():
        acc[layer] = CovarianceAccumulator(h.shape[-1])
        acc[layer].add(h[positions != 0])
    return HiddenBasis.fit(acc, rank)


def _roundtrip(ctx: Context, h: torch.Tensor, layer: int, dtype: str, basis, positions, width: int, chunk_rows: int):
    """Encode one layer's states [n, T, D] as a shard holds them, write and read the zarr group; returns
    (bytes per token, the states at the stored positions, their reconstruction)."""
    from sad_pipe.bench.storage import roundtrip

    n, t, d = h.shape
    keep = None
    ident = {"teacher": {"vocab_size": 2, "hidden_size": d}, "top_k": 1, "values": "uint8", "temperatures": [1.0],
             "store_target_logprob": False, "hidden_dtype": dtype, "layers": [layer], "packing": {"max_length": t},
             "hidden": {"rank": basis.rank if basis else None, "positions": positions}}
    host = {}
    if positions != "all":
        kept = np.stack([kept_positions(positions, t, "eval", i) for i in range(n)])
        keep = torch.from_numpy(kept)
        host["kept_positions"] = kept.astype(np.uint16)
    enc = encode_states(h, dtype, basis, layer, keep)
    name = hidden_name(layer)
    host[name] = enc["values"].numpy()
    if "scale" in enc:
        host[name + "_scale"] = enc["scale"].numpy()
    specs = [s for s in shard_arrays(ident) if s.name in host]
    per_token, _, read, _ = roundtrip(host, specs, chunk_rows, ctx.work)
    rows = kept_count(positions, t)
    z = decode_hidden(torch.from_numpy(read[name]), torch.from_numpy(read[name + "_scale"]) if name + "_scale" in read
                      else None, dtype)
    approx = basis.reconstruct(layer, z) if basis else z
    exact = h if keep is None else h.gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
    # roundtrip divides by the array's rows; every token of the sequence is the unit here
    return sum(per_token.values()) * rows / t, exact.reshape(-1, d), approx.reshape(-1, d)


def run(ctx: Context) -> Result:
    from sad_pipe.pipeline.config import CacheConfig

    sizes = ctx.pick(SIZES)
    teacher = ctx.assets.sharp_teacher(sizes["teacher"])
    layers = list(range(1, sizes["teacher"].width["num_hidden_layers"] + 1))
    chunk_rows = CacheConfig().sequences_per_chunk
    fit_states, fit_positions = _states(ctx, teacher, teacher.train_jsonl, sizes["fit_sequences"], sizes["batch"], layers)
    states, _ = _states(ctx, teacher, teacher.held_out, sizes["eval_sequences"], sizes["batch"], layers)
    width = states[layers[0]].shape[-1]
    full = _fit(fit_states, fit_positions, max(sizes["ranks"]))  # one decomposition: every rank is its top R
    fit_tokens = full.fit_tokens
    del fit_states
    modes = [(None, "bf16", "all"), (None, "int8", "all")]
    modes += [(r, dt, "all") for r in sizes["ranks"] for dt in ("int8", "bf16")]
    modes += [(None, "bf16", POSITIONS[0]), (None, "int8", POSITIONS[1]), (64 if 64 in sizes["ranks"] else sizes["ranks"][0],
                                                                         "int8", POSITIONS[0])]
    res = Result()
    table = Table(f"Hidden states per storage mode (width {width}, V={sizes['teacher'].vocab} teacher, held-out text)",
                  ["layer", "mode", "B/token/layer", "÷ bf16", "rel. error", "cosine (mean / min)", "var. expl."])
    rows, bf16 = [], {}
    for layer in layers:
        for rank, dtype, positions in modes:
            basis = None
            if rank:
                basis = HiddenBasis({l: full.means[l] for l in layers}, {l: full.bases[l][:, :rank] for l in layers},
                                    full.eigenvalues, fit_tokens)
            per_token, exact, approx = _roundtrip(ctx, states[layer], layer, dtype, basis, positions, width, chunk_rows)
            err = reconstruction_error(exact, approx)
            name = mode_name(rank, dtype, positions)
            if name == "bf16":
                bf16[layer] = per_token
            ratio = bf16[layer] / per_token
            explained = basis.variance_explained(layer) if basis else None
            rows.append({"layer": layer, "mode": name, "rank": rank, "dtype": dtype, "positions": positions,
                         "bytes_per_token": per_token, "ratio_vs_bf16": ratio, **err, "variance_explained": explained})
            table.rows.append([str(layer), name, f"{per_token:,.0f}", f"{ratio:.1f}x", f"{err['relative_error']:.3f}",
                               f"{err['cosine']:.4f} / {err['cosine_min']:.3f}",
                               "-" if explained is None else f"{explained:.3f}"])
    res.tables.append(table)
    res.data["hidden_modes"] = rows
    res.data["fit_tokens"] = fit_tokens
    for name in sorted({r["mode"] for r in rows}, key=[r["mode"] for r in rows].index):
        of = [r for r in rows if r["mode"] == name]
        if name == "bf16":
            continue
        target = (">=", TARGET_RATIO) if width >= 1024 and name == CHOSEN else None
        res.figures.append(Figure(f"hidden states {name}: bf16 bytes ÷ these (mean of layers {', '.join(map(str, layers))}; "
                                  f"rel. error {statistics.mean(r['relative_error'] for r in of):.3f}, cosine "
                                  f"{statistics.mean(r['cosine'] for r in of):.3f})",
                                  [statistics.mean(r["ratio_vs_bf16"] for r in of)], "x", "bf16 B/token/layer",
                                  name, target))
    res.notes += [
        f"Basis: fitted on {fit_tokens:,} states of the teacher's training text (first {sizes['fit_sequences']} sequences, "
        "position 0 left out), one eigendecomposition for every rank; errors on "
        f"{sizes['eval_sequences']} held-out sequences it never saw.",
        f"Target: >= {TARGET_RATIO:g}x fewer bytes than bf16 at width >= 1024 for {CHOSEN} (cache.hidden_rank 64, "
        "hidden_dtype int8), the mode the README recommends for real widths.",
    ]
    return res
