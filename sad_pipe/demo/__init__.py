"""The embedded demo behind `make all`: data and a tokenizer that need no download, and the report.

The chain itself is in demo.mk: every step is a plain `sad-pipe` command with a config from
configs/demo/, so the demo exercises exactly what users run on their own models.
"""
