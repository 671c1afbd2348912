"""Typed errors. The library raises these; only the CLI turns them into messages and exit codes.

Every message names the thing that is wrong (file, key, shard) and, where useful, what was expected
and what was found, so a user never needs a traceback to act on it.
"""


class SadPipeError(Exception):
    """A problem the user can fix: bad input, a damaged cache, a mismatch. Exit code 1."""

    exit_code = 1


class ConfigError(SadPipeError):
    """Invalid configuration or command-line usage. Exit code 2 (click's usage-error code)."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            super().__init__(f"config error{where}: {self.problems[0]}")
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            super().__init__(f"config error{where} ({len(self.problems)} problems):\n{lines}")


class CacheError(SadPipeError):
    """The cache is missing, incomplete, damaged, or not the one this run expects."""


class IdentityMismatch(CacheError):
    """An existing cache was built from different inputs; mixing them would corrupt it."""


class DataError(SadPipeError):
    """The dataset cannot be loaded or yields nothing usable."""


class ModelError(SadPipeError):
    """A model or tokenizer cannot be loaded, or does not fit the cache/config."""


class TrainingError(SadPipeError):
    """Training cannot go on (for example too many non-finite losses in a row)."""
