"""Train a student from the cache with transformers' `Trainer` (and so with accelerate, FSDP or DeepSpeed).

    cache = open_cache("runs/cache")
    trainer = DistillTrainer(model=student, args=TrainingArguments(...), cache=cache, kd_form="hybrid", temperature=1.0)
    trainer.train()

The loss is train-student's: kd_weight * KD (sad_pipe.kd_losses, the cached targets of the chosen form at T)
+ ce_weight * CE, each a mean over the micro-batch's trained positions; the Trainer divides it by the
accumulation steps, as train-student does. The train set is `cache.dataset("train", **FORM_FIELDS[kd_form])` in
train-student's order (`Cache.training_order`, seeded with `args.seed`): the same sequences in the same micro-
batches, each compressed chunk decompressed once per shuffle buffer. The student runs its whole forward (the
logits [B, T, V] exist, as in any HF training), so a sharded model (FSDP, DeepSpeed ZeRO-3) needs nothing
special. Under several processes each rank's micro-batch mean enters DDP's (or FSDP's) gradient average with
the same weight; train-student divides every rank's sum by the global count of trained positions instead, so
the two agree exactly only where the ranks' micro-batches hold equally many. What train-student adds and this
does not: the curriculum, feature/relation losses with the layer router, the NaN policy, sample-exact resume
on any number of ranks.

Logged next to the Trainer's `loss`: `kd`, `ce` and `agreement` (top-1 agreement with the teacher), means over
the micro-batches since the last log on this process, unrounded.
"""

from __future__ import annotations

from torch.utils.data import Sampler
from transformers import Trainer

from sad_pipe.dataset import Cache, collate
from sad_pipe.kd import FORM_FIELDS, kd_losses


class TrainingOrder(Sampler):
    """train-student's sequence order for the epoch the Trainer sets (it calls set_epoch every epoch)."""

    def __init__(self, cache: Cache, split: str, seed: int):
        self.cache, self.split, self.seed, self.epoch = cache, split, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.cache.splits[self.split]

    def __iter__(self):
        return iter(self.cache.training_order(self.split, seed=self.seed, epoch=self.epoch))


class CachedKDLoss:
    """The loss, for any `Trainer` subclass (DistillTrainer below; TRL's SFTTrainer, see the README):
    kd_weight * KD + ce_weight * CE on batches of `cache.dataset(..., **FORM_FIELDS[kd_form])` examples (or its
    `to_hf()`)."""

    # compute_loss returns a mean over one micro-batch: the Trainer divides it by the accumulation steps itself
    loss_is_scaled_for_ga = False

    def __init__(self, *args, cache: Cache, kd_form: str = "hybrid", temperature: float = 1.0, kd_weight: float = 0.7,
                 ce_weight: float = 0.3, **kwargs):
        self.cache, self.kd_form, self.temperature = cache, kd_form, temperature
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # the teacher fields are no arguments of the model's forward
        # Not the model's own loss, so not its loss kwargs: transformers older than loss_is_scaled_for_ga read this
        # to decide whether to divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._sums: dict[str, float] = {}
        self._count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
        losses = kd_losses(inputs, logits=outputs.logits, form=self.kd_form, temperature=self.temperature,
                           vocab_limit=self.cache.vocab_size)
        loss = self.kd_weight * losses["kd"] + self.ce_weight * losses["ce"]
        if model.training:
            for name, value in losses.items():
                self._sums[name] = self._sums.get(name, 0.0) + value.detach()
            self._count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._count and "loss" in logs:  # a training log: add the components since the last one
            logs.update({name: float(total) / self._count for name, total in self._sums.items()})
            self._sums, self._count = {}, 0
        super().log(logs, start_time)


class DistillTrainer(CachedKDLoss, Trainer):
    """A `Trainer` whose loss is KD on the cache plus CE. `cache`: an opened cache; its train split (the fields
    `kd_form` reads, at `temperature`, the top `top_k`) is the train set unless `train_dataset` is given."""

    def __init__(self, *args, cache: Cache, kd_form: str = "hybrid", temperature: float = 1.0, top_k: int | None = None,
                 **kwargs):
        if kd_form not in FORM_FIELDS:
            raise ValueError(f"kd_form {kd_form!r}: one of {', '.join(FORM_FIELDS)}")
        kwargs.setdefault("train_dataset", cache.dataset("train", **FORM_FIELDS[kd_form], temperature=temperature,
                                                         top_k=top_k))
        super().__init__(*args, cache=cache, kd_form=kd_form, temperature=temperature, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        return TrainingOrder(self.cache, "train", self.args.seed)
