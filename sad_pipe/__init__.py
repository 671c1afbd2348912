"""sad-pipe: distil a large causal LM into a small one through a cache of teacher outputs.

The public read API, for training stacks of your own (README "The cache in your own stack"):
    open_cache(path_or_url)   -> Cache: .dataset(split, topk=, draws=, temperature=, top_k=, layers=), .training_order(...)
    collate(examples)         -> a batch
    kd_loss, kd_losses        the KD (and CE) losses of train-student on such a batch
    FORM_FIELDS               what .dataset needs for each KD form: cache.dataset(split, **FORM_FIELDS["hybrid"])
    feature_loss, relation_loss  the hidden-state losses (plain functions over tensors)
    DistillTrainer            a transformers Trainer with that loss, in train-student's data order
"""

__version__ = "0.1.0"

# Imported on first use (PEP 562): `import sad_pipe.cli` or `sad_pipe.storage` stays free of torch-level imports
# it does not need, and no import cycle can form through this file.
_EXPORTS = {"open_cache": "sad_pipe.dataset", "collate": "sad_pipe.dataset", "Cache": "sad_pipe.dataset",
            "CacheExamples": "sad_pipe.dataset", "kd_loss": "sad_pipe.kd", "kd_losses": "sad_pipe.kd",
            "FORM_FIELDS": "sad_pipe.kd",
            "feature_loss": "sad_pipe.kd", "relation_loss": "sad_pipe.kd", "DistillTrainer": "sad_pipe.hf_trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sad_pipe' has no attribute {name!r}")
