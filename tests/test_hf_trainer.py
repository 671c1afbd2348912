"""DistillTrainer (transformers.Trainer) against train-student at the same settings: the same losses step by step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_llama
from stages.train_student.helpers import metrics, train, train_config
from transformers import AutoModelForCausalLM, TrainingArguments

from sad_pipe import DistillTrainer, open_cache

STEPS = 20
# train-student's settings, spelled for both: AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.01 on matrices
# only (both leave norms and biases out), cosine decay with no warm-up (the two differ only in warm-up: HF's first
# warm-up step has lr 0, train-student's peak / warmup), clipping at 1.0; one or two micro-batches per step (both
# average the micro-batch means; the logged figures too).
LR, BATCH, DECAY, CLIP, SEED = 3e-3, 4, 0.01, 1.0, 0
WEIGHTS = {"kd": 0.7, "ce": 0.3, "feature": 0.0, "relation": 0.0}


@pytest.mark.parametrize(("form", "temperature", "accumulation"), [("hybrid", 1.0, 1), ("tail", 2.0, 2)])
def test_twenty_trainer_steps_give_train_students_losses(tmp_path, kd_cache, form, temperature, accumulation):
    student = save_llama(str(tmp_path / "student"), 512, hidden=32, layers=2, seed=1)
    train(train_config(tmp_path, kd_cache, student={"model": student},
                       train={"max_steps": STEPS, "batch_size": BATCH, "gradient_accumulation_steps": accumulation,
                              "learning_rate": LR, "warmup_steps": 0,
                              "lr_schedule": "cosine", "weight_decay": DECAY, "max_grad_norm": CLIP, "seed": SEED},
                       loss={"kd_form": form, "temperature": temperature},
                       curriculum={"use_curriculum": False, "weights": WEIGHTS}))
    theirs = metrics(tmp_path / "run")

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=accumulation,
                             learning_rate=LR, warmup_steps=0, lr_scheduler_type="cosine", weight_decay=DECAY,
                             adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, optim="adamw_torch",
                             max_grad_norm=CLIP, seed=SEED, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_drop_last=True)
    trainer = DistillTrainer(model=AutoModelForCausalLM.from_pretrained(student), args=args, cache=open_cache(kd_cache),
                             kd_form=form, temperature=temperature, kd_weight=WEIGHTS["kd"], ce_weight=WEIGHTS["ce"])
    trainer.train()
    ours = [row for row in trainer.state.log_history if "kd" in row]

    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, STEPS + 1))
    assert [r["learning_rate"] for r in ours] == pytest.approx([r["lr"] for r in theirs], rel=1e-12)
    # Equal to the last bit on the development machine (CPU, fp32): the same batches, the same float operations in
    # the same order. The tolerance only leaves room for a BLAS that picks another kernel for [B, T, D] than for
    # [B*T, D] (the Trainer's model applies its head to the first, train-student to the second).
    for a, b in zip(ours, theirs):
        for name in ("kd", "ce", "agreement"):
            assert a[name] == pytest.approx(b[name if name == "agreement" else f"loss/{name}"], rel=1e-6), (a["step"], name)
    assert theirs[-1]["loss/ce"] < theirs[0]["loss/ce"] - 0.2  # it trains: the comparison covers a moving student


def test_the_example_script_trains_and_saves_a_loadable_student(tmp_path, kd_cache):
    import runpy

    example = runpy.run_path(str(Path(__file__).resolve().parent.parent / "examples" / "train_with_hf_trainer.py"))
    student = save_llama(str(tmp_path / "student"), 512, seed=1)
    example["main"](["--cache", kd_cache, "--student", student, "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
                     "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu",
                     "--save_strategy", "no", "--disable_tqdm", "true"])
    final = tmp_path / "out" / "final"
    trained = AutoModelForCausalLM.from_pretrained(final)
    before = AutoModelForCausalLM.from_pretrained(student)
    assert not torch.equal(trained.model.norm.weight, before.model.norm.weight)  # it trained
    assert (final / "tokenizer.json").exists()


def test_trls_sft_trainer_takes_the_loss_and_the_hf_view(tmp_path, kd_cache):
    trl = pytest.importorskip("trl", reason="trl not installed (pip install -e \".[trl]\")")
    from sad_pipe import collate, kd_losses
    from sad_pipe.hf_trainer import CachedKDLoss

    class CachedSFTTrainer(CachedKDLoss, trl.SFTTrainer):
        pass

    cache = open_cache(kd_cache)
    train_set = cache.dataset("train", topk=True, temperature=2.0)
    student = save_llama(str(tmp_path / "student"), 512, seed=1)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=BATCH, learning_rate=LR,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                         bf16=False, activation_checkpointing=False,  # TRL's defaults are on; fp32 here, to compare
                         dataset_kwargs={"skip_prepare_dataset": True})  # the cache is tokenized and packed already
    trainer = CachedSFTTrainer(model=AutoModelForCausalLM.from_pretrained(student), args=args, cache=cache,
                               train_dataset=train_set.to_hf(), processing_class=cache.tokenizer(), kd_form="tail", temperature=2.0)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "kd" in row]
    assert [r["step"] for r in logged] == [1, 2, 3]
    # step 1's loss is the untrained student's on the HF view's first micro-batch: sequences 0..BATCH-1
    batch = collate([train_set[i] for i in range(BATCH)])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(student)(input_ids=batch["input_ids"],
                                                               position_ids=batch["position_ids"]).logits
    expected = kd_losses(batch, logits=logits, form="tail", temperature=2.0, vocab_limit=cache.vocab_size)
    assert logged[0]["kd"] == pytest.approx(float(expected["kd"]), rel=1e-6)
    assert logged[0]["ce"] == pytest.approx(float(expected["ce"]), rel=1e-6)
