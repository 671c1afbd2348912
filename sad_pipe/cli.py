"""The `sad-pipe` command: parse -> config -> stage.run(config) -> report. Nothing else lives here.

Exit codes: 0 success, 1 a runtime problem (bad cache, bad data, NaN abort...), 2 a usage or config
error. User mistakes print one line (or one line per config key), never a traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import sys
import time
from pathlib import Path

import click

from sad_pipe.errors import SadPipeError

TIMED = {"cache-teacher", "train-student", "verify", "demo", "bench"}


class _Failure(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _close_progress_bars() -> None:
    """A failure leaves its stage's tqdm bar open mid-line: close it, so the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _failure(exc: BaseException) -> _Failure | None:
    """The one-line message and exit code of an expected failure; None for a bug (which keeps its traceback)."""
    if isinstance(exc, SadPipeError):
        return _Failure(str(exc), exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return _Failure("interrupted; committed work is kept, re-run the same command to resume", 130)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {exc.filename}" if exc.filename else ""
        return _Failure(f"no space left on device{where}; committed work is kept (the part being written is not): "
                        "free some space and re-run the same command to resume", 1)
    return None


def _reporting_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SadPipeError, KeyboardInterrupt, OSError) as exc:
            failure = _failure(exc)
            if failure is None:
                raise
            _close_progress_bars()
            raise failure from None
    return wrapper


def _config(config_path, overrides, flags: dict):
    from sad_pipe.pipeline.config import load_config

    extra = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    return load_config(config_path, tuple(overrides) + tuple(extra))


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), multiple=True,
                             help="JSON config file; repeat to layer files (later ones override earlier ones).")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override one config value (JSON value or plain string); repeatable.")


def _print(obj: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, default=str))
        return
    for key, value in obj.items():
        click.echo(f"{key:>28}: {_text(value)}")


def _text(value, nested: bool = False) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        inner = ", ".join(f"{k}={_text(v, True)}" for k, v in value.items())
        return f"({inner})" if nested else inner
    return str(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.version_option(package_name="sad-pipe")
@click.pass_context
def main(ctx: click.Context, quiet: bool) -> None:
    """sad-pipe: cache a teacher LLM's outputs once, then distil students from the cache."""
    start = time.perf_counter()
    if not quiet and ctx.invoked_subcommand in TIMED:  # `make all` reads as a list of timed stages
        ctx.call_on_close(lambda: click.echo(f"[sad-pipe {ctx.invoked_subcommand}: {time.perf_counter() - start:.1f} s]", err=True))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr,
                        force=True)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.command("cache-teacher")
@config_option
@set_option
@click.option("--output", help="Cache directory or URL (cache.path).")
@click.option("--dry-run", is_flag=True, help="Count tokens and project the cache size from a small sample; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_reporting_errors
def cache_teacher_cmd(config_path, overrides, output, dry_run, as_json):
    """Stage one: run the teacher over the dataset and fill the cache (resumes if interrupted)."""
    from sad_pipe.pipeline import distributed
    from sad_pipe.stages import cache_teacher

    cfg = _config(config_path, overrides, {"cache.path": output})
    distributed.init()
    summary = cache_teacher.run(cfg, dry_run=dry_run)
    if distributed.rank() == 0:
        _print(summary, as_json)


@main.command("train-student")
@config_option
@set_option
@click.option("--output", help="Run directory (train.output).")
@click.option("--epochs", type=int, help="train.epochs")
@click.option("--max-steps", type=int, help="train.max_steps (optimizer steps)")
@click.option("--dry-run", is_flag=True, help="Check everything, print the plan and the projected peak memory by part; train nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_reporting_errors
def train_student_cmd(config_path, overrides, output, epochs, max_steps, dry_run, as_json):
    """Stage two: train a student from the cache (the teacher is never loaded, except for kd_form=full)."""
    from sad_pipe.pipeline import distributed
    from sad_pipe.stages import train_student

    cfg = _config(config_path, overrides, {"train.output": output, "train.epochs": epochs, "train.max_steps": max_steps})
    distributed.init()
    result = train_student.run(cfg, dry_run=dry_run)
    if distributed.rank() == 0:
        _print(result, as_json)


@main.command("inspect")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True)
@_reporting_errors
def inspect_cmd(cache, as_json):
    """What a cache holds: identity, sequences, tokens, shards, bytes per token per array, top-k mass."""
    from sad_pipe.storage.inspect import describe

    _print(describe(cache), as_json)


@main.command("verify")
@click.argument("cache")
@click.option("--full", is_flag=True, help="Also hash every file and decode every chunk.")
@click.option("--repair", is_flag=True, help="Re-create damaged shards by re-running exactly their sequences through the teacher.")
@click.option("--json", "as_json", is_flag=True)
@_reporting_errors
def verify_cmd(cache, full, repair, as_json):
    """Check a cache; exit 0 when intact, 1 with the damaged shards listed otherwise."""
    from sad_pipe.stages.cache_teacher.maintenance import repair_cache, verify_cache

    report = repair_cache(cache)[0] if repair else verify_cache(cache, full=full)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        state = "intact" if report.ok else "DAMAGED"
        click.echo(f"{cache}: {state} ({report.shards_checked} shards, {report.files_checked} files"
                   f"{', ' + format(report.bytes_checked, ',') + ' bytes hashed' if report.full else ''})"
                   f"{'' if report.complete or not report.ok else ' - incomplete: no manifest yet'}")
        for where, problems in report.problems.items():
            for p in problems:
                click.echo(f"  {where}: {p}")
    if not report.ok:
        sys.exit(1)


@main.command("gc")
@click.argument("cache")
@_reporting_errors
def gc_cmd(cache):
    """Remove temporary and uncommitted files; never run it while cache-teacher writes to CACHE."""
    from sad_pipe.storage.fs import CacheFS
    from sad_pipe.storage.verify import collect_garbage

    result = collect_garbage(CacheFS(cache))
    click.echo(f"removed {len(result['removed'])} leftovers, freed {result['bytes']:,} bytes")


@main.command("bench")
@click.option("--output", default="bench", show_default=True, type=click.Path(file_okay=False),
              help="Where results.json and results.md go.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Default: cpu; cuda with --gpu-check.")
@click.option("--only", multiple=True, help="Run only these benchmarks (repeatable); default: all.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Repetitions; figures are medians.")
@click.option("--quick", is_flag=True, help="Tiny sizes: checks the benchmarks run, measures nothing worth quoting.")
@click.option("--gpu-check", is_flag=True,
              help="Only the benchmarks a GPU must measure (make gpu-check), into gpu-results.json and gpu-results.md.")
@_reporting_errors
def bench_cmd(output, device, only, repeats, quick, gpu_check):
    """Performance figures, each a ratio against its baseline measured side by side in the same run."""
    from sad_pipe.bench import run_benchmarks

    device = device or ("cuda" if gpu_check else "cpu")
    click.echo(run_benchmarks(Path(output), device=device, only=list(only), repeats=repeats, quick=quick,
                              gpu_check=gpu_check))


@main.group("demo")
def demo_group():
    """Steps of the embedded demo behind `make all` (corpus, tokenizer, report)."""


@demo_group.command("corpus")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--max-mb", type=float, default=8.0, show_default=True, help="Text to take from the standard library.")
@_reporting_errors
def demo_corpus_cmd(output, max_mb):
    """Write the standard library's .py source as OUTPUT/corpus.jsonl (one document per file)."""
    from sad_pipe.demo.assets import build_corpus

    _print(build_corpus(Path(output), int(max_mb * 1e6)), False)


@demo_group.command("tokenizer")
@click.argument("corpus", type=click.Path(dir_okay=False, exists=True))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--vocab-size", type=int, default=8192, show_default=True)
@_reporting_errors
def demo_tokenizer_cmd(corpus, output, vocab_size):
    """Train a byte-level BPE tokenizer on CORPUS (jsonl) and save it as an HF tokenizer in OUTPUT."""
    from sad_pipe.demo.assets import read_corpus, train_bpe_tokenizer

    train_bpe_tokenizer(read_corpus(Path(corpus)), vocab_size, Path(output))
    click.echo(f"tokenizer with {vocab_size} tokens saved to {output}")


@demo_group.command("sharp-teacher")
@click.argument("output", type=click.Path(file_okay=False))
@_reporting_errors
def demo_sharp_teacher_cmd(output):
    """Build (once per machine) a sharp demo-shaped teacher and link it into OUTPUT (for make compare TEACHER=sharp)."""
    from sad_pipe.demo.assets import link_sharp_teacher

    _print(link_sharp_teacher(Path(output)), False)


@demo_group.command("report")
@click.argument("demo_dir", type=click.Path(file_okay=False, exists=True))
@_reporting_errors
def demo_report_cmd(demo_dir):
    """Write DEMO_DIR/report.md and plots from the runs' own result files, and print it."""
    from sad_pipe.demo.report import build_report

    click.echo(build_report(Path(demo_dir)))


@demo_group.command("compare")
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option("--baseline", "baselines", multiple=True, help="Method(s) to pair with (repeatable); default: ce and full.")
@click.option("--within", type=float, default=1.0, show_default=True,
              help="The verdict: every seed within this many % of the last baseline.")
@_reporting_errors
def demo_compare_cmd(root, baselines, within):
    """Paired method differences over seeds: ROOT/seed-*/<method>/result.json -> ROOT/compare.md."""
    from sad_pipe.demo.report import build_comparison

    click.echo(build_comparison(Path(root), tuple(baselines) or ("ce", "full"), within))


@demo_group.command("diagnose")
@config_option
@set_option
@click.option("--teacher", required=True, help="The teacher the cache was built from (run online, for full KD).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Where diagnose.jsonl and .md go.")
@click.option("--follow", default="tail", show_default=True, help="The KD form whose trajectory the student follows.")
@click.option("--steps", type=int, default=200, show_default=True)
@_reporting_errors
def demo_diagnose_cmd(config_path, overrides, teacher, output, follow, steps):
    """Gradients of every cached KD form vs online full KD, step by step on the same batches."""
    from sad_pipe.demo.diagnose import diagnose

    click.echo(diagnose(list(config_path), list(overrides), teacher, Path(output), follow, steps))


@main.command("config-reference", hidden=True)
def config_reference_cmd():
    """Print the config reference (Markdown) that the README embeds."""
    from sad_pipe.pipeline.config import reference_markdown

    click.echo(reference_markdown())


if __name__ == "__main__":
    main()
