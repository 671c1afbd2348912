"""train-student under torchrun (DDP, gloo): two ranks at batch 4 train the same student as one process at batch 8,
a run stopped at two ranks resumes on one at the same sample, and the data order is a function of (seed, epoch,
global batch) only.

The runs: 4 optimizer steps of 2 accumulated micro-batches (no_sync on the first), the default curriculum (the
layer router is idle in phase 1, so DDP has unused parameters there, then feature and relation losses ramp in),
an eval at step 2 whose last batch leaves rank 1 with nothing, a checkpoint every 2 steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

from sad_pipe.storage.reader import CacheDataset, FieldSchedule

from .helpers import torchrun

STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
GLOBAL_BATCH, STEPS = 8, 4
TRAIN = {"max_steps": STEPS, "gradient_accumulation_steps": 2, "save_steps": 2, "keep_checkpoints": 4, "eval_steps": 2,
         "warmup_steps": 1, "learning_rate": 3e-3, "eval_max_sequences": 4, "seed": 0}
# fp32 sums over 4 + 4 sequences (two ranks, averaged by DDP) and over 8 round differently in the last bits; after
# AdamW almost every weight agrees to ~3e-7. A few entries get gradients near Adam's eps (embedding rows of rare
# tokens, the zero-initialised router gates: sums of nearly cancelling terms), where g / (sqrt(v) + eps) amplifies
# the last-bit noise: measured up to 1.4e-5 in 2 of 68k entries. A real difference (another sample, a lost or
# doubled micro-batch, a missed gradient sync) moves nearly every weight by ~lr = 3e-3.
ATOL, NOISY_ABOVE, NOISY_SHARE = 1e-4, 1e-6, 1e-3


def train_config(tmp_path: Path, cache: str, name: str, ranks: int) -> str:
    cfg = {"cache": {"path": cache}, "student": {"config": STUDENT},
           "train": {**TRAIN, "output": str(tmp_path / name), "batch_size": GLOBAL_BATCH // ranks},
           "loss": {"kd_form": "tail", "temperature": 1.0}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def weights(run: Path, part: str) -> dict[str, torch.Tensor]:
    """Student and router weights, named as in a checkpoint ("student.*", "router.*"). A checkpoint holds both in
    model.safetensors; final/ has the student's save_pretrained, router.safetensors is beside it."""
    if part != "final":
        return load_file(str(run / part / "model.safetensors"))
    out = {f"student.{k}": v for k, v in load_file(str(run / part / "model.safetensors")).items()}
    return out | {f"router.{k}": v for k, v in load_file(str(run / "router.safetensors")).items()}


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(largest |a - b| over every weight of the student and the router, share of weights differing by more
    than NOISY_ABOVE)."""
    assert a.keys() == b.keys() and any(k.startswith("router.") for k in a)
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in sorted(a)])
    return float(diff.max()), float((diff > NOISY_ABOVE).float().mean())


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    largest, noisy = difference(a, b)
    print(f"{what}: max |difference| {largest:.3g}, share above {NOISY_ABOVE:g}: {noisy:.3g}")
    assert largest < ATOL and noisy < NOISY_SHARE, (what, largest, noisy)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> list[tuple]:
    """(step, split, {figure: value}) for every loss and agreement figure of every line."""
    return [(r["step"], r["split"], {k: v for k, v in r.items() if k.startswith(("loss/", "eval/", "agreement"))})
            for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference_cache, s3_cache) -> dict[str, Path]:
    """one: a single process at batch 8 reading the local cache;
    two: torchrun, two ranks at batch 4, reading the same data from the object store (each rank fetches the
    cache's tokenizer to a temp dir and reads its chunks over S3);
    resumed: two's run cut back to its step-2 checkpoint (as if stopped there), finished by one process at batch 8."""
    tmp = tmp_path_factory.mktemp("ddp")
    cli("-q", "train-student", "--config", train_config(tmp, reference_cache, "one", ranks=1))
    torchrun(2, "train-student", "--config", train_config(tmp, s3_cache, "two", ranks=2))
    shutil.copytree(tmp / "two", tmp / "resumed")
    for stale in ("checkpoints/step-00000004", "final", "result.json"):
        path = tmp / "resumed" / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = cli("train-student", "--config", train_config(tmp, reference_cache, "resumed", ranks=1))
    assert "resuming from" in result.output and "step 2 of 4" in result.output
    return {"one": tmp / "one", "two": tmp / "two", "resumed": tmp / "resumed"}


def test_two_ranks_train_the_same_student_as_one_process_at_the_same_global_batch(runs):
    plans = {k: json.loads((runs[k] / "plan.json").read_text()) for k in ("one", "two")}
    assert (plans["one"]["world_size"], plans["two"]["world_size"]) == (1, 2)
    assert plans["one"]["global_batch"] == plans["two"]["global_batch"] == GLOBAL_BATCH
    assert plans["one"]["total_steps"] == plans["two"]["total_steps"] == STEPS
    for part in ("checkpoints/step-00000002", "final"):
        assert_same_weights(weights(runs["one"], part), weights(runs["two"], part), f"1 vs 2 ranks, {part}")
    # The comparison can tell runs apart: two more steps move the weights far beyond the tolerance, nearly all.
    largest, moved = difference(weights(runs["one"], "checkpoints/step-00000002"), weights(runs["one"], "final"))
    assert largest > 10 * ATOL and moved > 0.5, (largest, moved)
    # Rank 0's metrics are the global batch's: per-rank losses averaged over the ranks, eval summed over them.
    one, two = losses(metrics(runs["one"])), losses(metrics(runs["two"]))
    assert [(s, split) for s, split, _ in one] == [(s, split) for s, split, _ in two]
    assert [s for s, split, _ in one if split == "eval"] == [2, STEPS]
    for (_, _, a), (_, _, b) in zip(one, two):
        assert a.keys() == b.keys() and a
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


def test_a_run_stopped_at_two_ranks_resumes_on_one_at_the_same_sample(runs):
    state = json.loads((runs["two"] / "checkpoints/step-00000002/state.json").read_text())
    assert (state["step"], state["epoch"], state["next_micro_batch"]) == (2, 0, 4)  # micro-batches of 8 sequences
    assert_same_weights(weights(runs["one"], "final"), weights(runs["resumed"], "final"), "1 rank vs 2 resumed on 1")
    one, resumed = losses(metrics(runs["one"])), losses(metrics(runs["resumed"]))
    assert [(s, split) for s, split, _ in one] == [(s, split) for s, split, _ in resumed]
    for (_, _, a), (_, _, b) in zip(one, resumed):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


def _micro_batches(url: str, ranks: int, epoch: int, start: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """The sequence ids of global micro-batches start..start+count-1 of `epoch`: the ranks' slices joined."""
    per_rank = []
    for rank in range(ranks):
        data = CacheDataset(url, "train", GLOBAL_BATCH // ranks, FieldSchedule(always={"input_ids"}), seed=seed,
                            rank=rank, world_size=ranks)
        data.set_position(epoch, start)
        batches = []
        for batch in data:
            batches.append(batch["sequence_ids"].numpy())
            if len(batches) == count:
                break
        per_rank.append(batches)
    return [np.concatenate(parts) for parts in zip(*per_rank)]


def test_the_sample_order_depends_on_seed_epoch_and_global_batch_not_on_the_ranks(reference_cache):
    for epoch, start in ((0, 0), (0, 5), (1, 3)):
        one = _micro_batches(reference_cache, 1, epoch, start, 4)
        assert len(one) == 4 and all(len(b) == GLOBAL_BATCH for b in one)
        for ranks in (2, 4):
            assert [b.tolist() for b in _micro_batches(reference_cache, ranks, epoch, start, 4)] == [b.tolist() for b in one]
    # ...and is a real shuffle: another epoch or another seed orders the sequences differently.
    first = np.concatenate(_micro_batches(reference_cache, 1, 0, 0, 4))
    assert len(set(first.tolist())) == 4 * GLOBAL_BATCH
    assert not np.array_equal(first, np.concatenate(_micro_batches(reference_cache, 1, 1, 0, 4)))
    assert not np.array_equal(first, np.concatenate(_micro_batches(reference_cache, 1, 0, 0, 4, seed=1)))
