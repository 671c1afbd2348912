"""Train a student from a sad-pipe cache with transformers' Trainer: the same KD + CE loss as train-student.

One process:
    python examples/train_with_hf_trainer.py --cache runs/demo/cache --student runs/demo/students/small/subset/final \
        --output_dir runs/hf-student --max_steps 200 --per_device_train_batch_size 8 --learning_rate 3e-4

A student too big for one GPU: the same script under accelerate, sharded with FSDP (or DeepSpeed ZeRO-3):
    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
        --fsdp_reshard_after_forward true --fsdp_state_dict_type FULL_STATE_DICT --mixed_precision bf16 --num_processes 8 \
        examples/train_with_hf_trainer.py --cache s3://bucket/caches/qwen --student Qwen/Qwen2.5-1.5B --bf16 ...

Every TrainingArguments flag works (--gradient_accumulation_steps, --lr_scheduler_type, --report_to tensorboard,
--gradient_checkpointing, ...); the student is saved with its tokenizer (the cache's) in --output_dir/final.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments

from sad_pipe import DistillTrainer, open_cache


@dataclass
class DistillArguments:
    cache: str = field(metadata={"help": "the cache: a path or an fsspec URL"})
    student: str = field(metadata={"help": "the student: a path or hub id sharing the cache's tokenizer"})
    kd_form: str = field(default="hybrid", metadata={"help": "hybrid, tail, subset or sampled (the cache must hold its targets)"})
    temperature: float = field(default=1.0, metadata={"help": "KD temperature; one the cache holds the logsumexp at"})
    kd_weight: float = 0.7
    ce_weight: float = 0.3
    top_k: int | None = field(default=None, metadata={"help": "use the teacher's top k' <= cached k"})


def main(argv: list[str] | None = None) -> DistillTrainer:
    distill, args = HfArgumentParser((DistillArguments, TrainingArguments)).parse_args_into_dataclasses(argv)
    cache = open_cache(distill.cache)
    student = AutoModelForCausalLM.from_pretrained(distill.student)
    trainer = DistillTrainer(model=student, args=args, cache=cache, kd_form=distill.kd_form,
                             temperature=distill.temperature, kd_weight=distill.kd_weight, ce_weight=distill.ce_weight,
                             top_k=distill.top_k)
    trainer.train()
    trainer.save_model(f"{args.output_dir}/final")
    if trainer.is_world_process_zero():
        cache.tokenizer().save_pretrained(f"{args.output_dir}/final")
    return trainer


if __name__ == "__main__":
    main()
