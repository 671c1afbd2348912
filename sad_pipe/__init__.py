"""sad-pipe: distil a large causal LM into a small one through a cache of teacher outputs."""

__version__ = "0.1.0"
