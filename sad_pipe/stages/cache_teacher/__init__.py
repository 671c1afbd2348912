"""Stage one: run the teacher once over the data and fill the cache (the story is in stage.py).

    vocab.py        the vocabulary pass on the device: top-k, logsumexp, chunk size
    runner.py       TeacherRunner: one batch of token ids -> the arrays a shard stores
    sink.py         ShardSink: the background thread that writes and commits shards
    plan.py         teacher checks, cache identity, packing into tokens/, plan.json
    dry_run.py      --dry-run: sizes projected from a sample, nothing written
    stage.py        run(config): plan -> fill every uncommitted shard -> finalize
    maintenance.py  verify (with the tokenizer check) and repair (re-runs damaged shards)
"""

from sad_pipe.stages.cache_teacher.stage import run

__all__ = ["run"]
