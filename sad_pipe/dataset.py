"""The cache as a dataset for your own training stack: `open_cache(path_or_url)`.

    cache = open_cache("runs/cache")                       # a path or an fsspec URL (s3://...)
    train = cache.dataset("train", topk=True, draws="hybrid", layers=[2])  # what kd_form hybrid needs
    train[17]                                              # sequence 17 of the split, decoded
    DataLoader(train, batch_size=8, collate_fn=collate)    # or transformers.Trainer, or train.to_hf()

One example is one packed sequence of T tokens, as torch tensors:
    sequence_id    int: its row in the split (what `dataset[i]` was asked for)
    input_ids      [T] int64; position_ids [T] int64 (restart at 0 where a packed document starts: pass
                   them to the model, so documents do not attend to each other, as the teacher ran)
    labels         [T] int64, HF convention (the model shifts them): input_ids where the token is trained,
                   -100 elsewhere; so `model(input_ids, position_ids=..., labels=labels).loss` is the CE
    loss_mask      [T] float32: 1 where the prediction at t (of token t + 1) is trained: the positions the
                   teacher arrays below describe (they hold zeros elsewhere)
  topk=True:
    topk_ids       [T, k] int64: the teacher's top-k ids after token t (k = top_k, default all cached)
    topk_logprobs  [T, k] float32: log p_T of those ids at `temperature`, exact (the full-vocabulary logsumexp
                   at T is cached), so they sum to less than 1 by exactly the tail mass
    tail_mass      [T] float32: the teacher's probability mass outside those k ids at T
    temperature    float: the T of topk_logprobs and of the draws (the KD losses check they are given the same)
  draws="hybrid" (with topk=True; cache.targets hybrid):
    tail_ids       [T, N] int64: the distinct ids of N draws from the teacher's distribution outside the top-k
    tail_counts    [T, N] float32: how often each was drawn (0 in unused slots); the hybrid target is the
                   exact top-k plus tail_mass * counts / N on these ids: unbiased for full KD
  draws="sampled" (cache.targets sampled):
    sample_ids, sample_counts  [T, N]: N draws from the teacher's whole distribution (RS-KD)
  Draws exist at one temperature only (the cache's sample_temperature): ask for the dataset at that T.
  layers=[L, ...]:
    hidden_<L>     [T, D] float32: the teacher's output_hidden_states[L]

Reading goes through the same checksummed reader as train-student: a damaged chunk raises the same
`CacheError` naming its shard, never decoded garbage. Neighbouring sequences share a compressed chunk; the
dataset keeps the last few chunks decoded, so reading in order (or in `training_order`) decompresses each once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from sad_pipe.errors import CacheError
from sad_pipe.storage.codecs import decode_hidden, decode_samples, decode_topk, torch_view
from sad_pipe.storage.hidden import describe_positions, hidden_mode, positions_subsampled
from sad_pipe.storage.manifest import DRAW_ARRAYS, hidden_name, target_forms
from sad_pipe.storage.reader import CacheReader, DecodedChunks, epoch_order

IGNORE_INDEX = -100  # labels the HF losses skip


def open_cache(url: str) -> Cache:
    """A complete cache written by `sad-pipe cache-teacher`: a local path or an fsspec URL."""
    return Cache(CacheReader(str(url)))


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Examples -> a batch: every field stacked on a new first axis (all sequences have the same length)."""
    return default_collate(examples)


class Cache:
    """An opened cache: what it holds, its tokenizer, and its splits as datasets."""

    def __init__(self, reader: CacheReader):
        self.reader = reader
        self.url = reader.url
        self.identity = reader.identity

    @property
    def splits(self) -> dict[str, int]:
        """{split: sequences}."""
        return {split: self.reader.sequences(split) for split in sorted(self.reader.plan.splits)}

    @property
    def max_length(self) -> int:
        return self.reader.max_length

    @property
    def top_k(self) -> int:
        return self.reader.scheme.k

    @property
    def temperatures(self) -> list[float]:
        return self.reader.temperatures

    @property
    def target_forms(self) -> list[str]:
        """The teacher target forms cached (cache.targets): topk, and hybrid / sampled where their draws are."""
        return sorted(target_forms(self.identity))

    @property
    def layers(self) -> list[int]:
        return self.reader.layers

    @property
    def vocab_size(self) -> int:
        """len(tokenizer): the ids that are tokens (a student's padded embedding rows past it are none)."""
        return self.identity["tokenizer"]["size"]

    def tokenizer(self):
        """The teacher's tokenizer, as the cache stores it, checked against its recorded hashes like train-student
        checks it (and never running code from the cache)."""
        from sad_pipe.stages.train_student.train import cache_tokenizer

        return cache_tokenizer(self.reader)

    def dataset(self, split: str = "train", *, topk: bool = False, draws: str | None = None, temperature: float = 1.0,
                top_k: int | None = None, layers: list[int] = ()) -> CacheExamples:
        """A map-style torch Dataset of the split's sequences; the teacher fields only when asked for
        (sad_pipe.kd.FORM_FIELDS: what each KD form needs)."""
        return CacheExamples(self.reader, split, topk=topk, draws=draws, temperature=temperature, top_k=top_k,
                             layers=layers)

    def training_order(self, split: str = "train", *, seed: int = 0, epoch: int = 0, buffer_chunks: int = 8) -> list[int]:
        """train-student's sequence order for one epoch (a function of seed and epoch): chunks shuffled, then
        sequences shuffled within groups of `buffer_chunks` chunks, so each chunk is decompressed once."""
        return epoch_order(self.reader.sequences(split), self.reader.chunk_rows, buffer_chunks, seed, epoch).tolist()


class CacheExamples(Dataset):
    """Decoded examples of one split (see the module docstring for the fields)."""

    def __init__(self, reader: CacheReader, split: str, *, topk: bool, temperature: float, top_k: int | None,
                 layers: list[int], draws: str | None = None, buffer_chunks: int = 8):
        if split not in reader.plan.splits:
            raise CacheError(f"{reader.url} has no {split!r} split (splits: {', '.join(sorted(reader.plan.splits))})")
        self.reader, self.split = reader, split
        self.topk, self.temperature, self.layers = topk, float(temperature), [int(l) for l in layers]
        self.top_k = top_k
        self.groups = {"input_ids"}
        if topk:
            self.groups |= {"topk", "lse"}
            if self.temperature not in reader.temperatures:
                raise CacheError(f"temperature {temperature:g}: topk_logprobs need the teacher's logsumexp at T, and "
                                 f"{reader.url} holds it only for T in {reader.temperatures}")
            if top_k is not None and not 0 < top_k <= reader.scheme.k:
                raise CacheError(f"top_k {top_k}: {reader.url} holds the top {reader.scheme.k}")
            self.reader.arrays_for(self.groups)  # a tokens-only cache: one line saying so
        self.draws = draws
        if draws is not None:
            self._check_draws(draws)
            self.groups.add({"hybrid": "tail_samples", "sampled": "samples"}[draws])
        missing = [l for l in self.layers if l not in reader.layers]
        if missing:
            raise CacheError(f"layers {missing}: {reader.url} holds the teacher's hidden states {reader.layers} only")
        if self.layers and (reader.hidden_rank or positions_subsampled(reader.identity)):
            mode = hidden_mode(reader.identity)
            raise CacheError(f"layers {self.layers}: {reader.url} stores hidden states as "
                             + (f"rank-{mode['rank']} basis coefficients" if mode["rank"] else "full states")
                             + f" at positions {describe_positions(mode['positions'])} (cache.hidden_rank / "
                             "hidden_positions); this API serves full states at every position: read the "
                             "coefficients with sad_pipe.storage.reader.CacheReader and its basis()")
        if self.layers:
            self.groups.add("hidden")
        self.buffer_chunks = buffer_chunks
        self._chunks = DecodedChunks(buffer_chunks)

    def _check_draws(self, draws: str) -> None:
        reader, forms = self.reader, target_forms(self.reader.identity)
        if draws not in DRAW_ARRAYS:
            raise ValueError(f"draws {draws!r}: one of {', '.join(DRAW_ARRAYS)} (or None)")
        if draws not in forms:
            raise CacheError(f"draws {draws!r}: {reader.url} holds no {draws} targets (its cache.targets: "
                             f"{', '.join(sorted(forms))})")
        drawn_at = float(reader.identity["targets"]["temperature"])
        if self.temperature != drawn_at:
            raise CacheError(f"temperature {self.temperature:g}: {reader.url}'s draws come from the teacher at "
                             f"T={drawn_at:g} (its cache.sample_temperature); ask for the dataset at that T")
        if draws == "hybrid" and not self.topk:
            raise ValueError("draws='hybrid' are the teacher's tail outside its top-k: ask for topk=True as well")
        if draws == "hybrid" and self.top_k not in (None, reader.scheme.k):
            raise ValueError(f"top_k {self.top_k}: the hybrid draws cover everything outside the cached top "
                             f"{reader.scheme.k}, so they go with all of it; leave top_k unset")

    def __len__(self) -> int:
        return self.reader.sequences(self.split)

    def _chunk(self, chunk: int) -> dict[str, np.ndarray]:
        return self._chunks.get(chunk, lambda: self.reader.read_chunk(self.split, chunk, self.groups))

    def __getitem__(self, sequence_id: int) -> dict:
        sequence_id = int(sequence_id)
        if not 0 <= sequence_id < len(self):
            raise IndexError(f"sequence {sequence_id} of {self.split}: the split has {len(self)}")
        chunk, offset = divmod(sequence_id, self.reader.chunk_rows)
        row = {name: torch_view(a[offset]) for name, a in self._chunk(chunk).items()}
        input_ids, loss_mask = row["input_ids"].long(), row["loss_mask"].float()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[1:] = torch.where(loss_mask[:-1] > 0, input_ids[1:], IGNORE_INDEX)
        out = {"sequence_id": sequence_id, "input_ids": input_ids, "position_ids": row["position_ids"].long(),
               "labels": labels, "loss_mask": loss_mask}
        if self.topk:
            top = decode_topk(row, self.reader.scheme, self.top_k)
            lse = row["lse"][:, self.reader.temperatures.index(self.temperature)].float()
            logprobs = top.logits / self.temperature - lse.unsqueeze(-1)
            out["topk_ids"], out["topk_logprobs"] = top.ids, logprobs
            out["tail_mass"] = (-torch.expm1(torch.logsumexp(logprobs, dim=-1))).clamp_min(0.0)  # 1 - sum p, accurately
            out["temperature"] = self.temperature
        if self.draws is not None:
            prefix = DRAW_ARRAYS[self.draws]
            out[f"{prefix}_ids"], out[f"{prefix}_counts"] = decode_samples(row, prefix)
            out["temperature"] = self.temperature
        for layer in self.layers:
            name = hidden_name(layer)
            out[name] = decode_hidden(row[name], row.get(name + "_scale"), self.reader.identity["hidden_dtype"])
        return out

    def to_hf(self):
        """The same examples as a `datasets.IterableDataset` (torch format), in sequence order. Its shards are
        the cache's chunks, so `split_dataset_by_node` and DataLoader workers each read whole chunks."""
        import datasets

        chunks = list(range(self.reader.num_chunks(self.split)))
        return datasets.IterableDataset.from_generator(_examples_of_chunks, gen_kwargs={"examples": self, "chunks": chunks},
                                                       features=self.hf_features()).with_format("torch")

    def hf_features(self):
        import datasets

        t = self.reader.max_length
        features = {"sequence_id": datasets.Value("int64"), "input_ids": datasets.List(datasets.Value("int64"), length=t),
                    "position_ids": datasets.List(datasets.Value("int64"), length=t),
                    "labels": datasets.List(datasets.Value("int64"), length=t),
                    "loss_mask": datasets.List(datasets.Value("float32"), length=t)}
        if self.topk:
            k = self.top_k or self.reader.scheme.k
            features.update(topk_ids=datasets.Array2D((t, k), "int64"), topk_logprobs=datasets.Array2D((t, k), "float32"),
                            tail_mass=datasets.List(datasets.Value("float32"), length=t))
        if self.draws is not None:
            prefix, n = DRAW_ARRAYS[self.draws], self.reader.identity["targets"]["samples"]
            features.update({f"{prefix}_ids": datasets.Array2D((t, n), "int64"),
                             f"{prefix}_counts": datasets.Array2D((t, n), "float32")})
        if self.topk or self.draws is not None:
            features["temperature"] = datasets.Value("float64")
        for layer in self.layers:
            width = self.reader.specs[hidden_name(layer)].per_token[0]
            features[hidden_name(layer)] = datasets.Array2D((t, width), "float32")
        return datasets.Features(features)


def _examples_of_chunks(examples: CacheExamples, chunks: list[int]):
    rows = examples.reader.chunk_rows
    for chunk in chunks:
        for i in range(chunk * rows, min((chunk + 1) * rows, len(examples))):
            yield {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in examples[i].items()}
