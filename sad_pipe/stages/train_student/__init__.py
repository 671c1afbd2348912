"""Stage two: train students from the cache (see train.py for the recipe)."""

from sad_pipe.stages.train_student.train import run

__all__ = ["run"]
