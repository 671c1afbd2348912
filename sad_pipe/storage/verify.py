"""verify (is every planned shard there, whole and sane?), gc (remove what no commit names), sizes.

Quick verify: the plan's shards are all committed, each committed file exists at its recorded size,
the manifest (if any) names exactly the committed shards. Full verify adds: sha256 of every file,
every chunk decoded (crc32c checked by zarr), shapes and row counts, ids < vocab, values finite.
A damaged shard is reported by name; `drop_shards` deletes its commit so that the next cache-teacher
run re-creates it whole (shards are never patched in place; `sad-pipe verify --repair` does both).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field

import numpy as np

from sad_pipe.errors import CacheError
from sad_pipe.storage.fs import CacheFS
from sad_pipe.storage.hidden import BASIS_FILE, KEPT
from sad_pipe.storage.manifest import (
    SPLITS,
    ArraySpec,
    Plan,
    check_format,
    commit_name,
    parse_commit_name,
    read_commits,
    read_plan,
)

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    cache: str
    full: bool
    complete: bool = False
    shards_checked: int = 0
    files_checked: int = 0
    bytes_checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)  # "split/shard" or "tokens/split" or "cache" -> problems

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, problem: str) -> None:
        self.problems.setdefault(where, []).append(problem)

    def damaged_shards(self) -> list[tuple[str, int]]:
        out = []
        for where in self.problems:
            split, _, shard = where.partition("/")
            if split in SPLITS and shard.isdigit():
                out.append((split, int(shard)))
        return sorted(out)

    def to_json(self) -> dict:
        return {"cache": self.cache, "full": self.full, "ok": self.ok, "complete": self.complete,
                "shards_checked": self.shards_checked, "files_checked": self.files_checked,
                "bytes_checked": self.bytes_checked, "problems": self.problems}


def _check_files(cache: CacheFS, rel: str, files: dict, full: bool, report: VerifyReport, where: str) -> bool:
    from sad_pipe.storage.writer import sha256_file

    try:
        present = cache.walk_files(rel)
    except FileNotFoundError:
        present = {}
    except CacheError as exc:  # a link out of the cache: reported, never followed
        report.add(where, str(exc))
        return False
    good = True
    if not present and files:
        report.add(where, f"{rel}: directory missing")
        return False
    for name, info in files.items():
        size = present.get(name)
        if size is None:
            report.add(where, f"{rel}/{name}: missing")
            good = False
        elif size != info["size"]:
            report.add(where, f"{rel}/{name}: {size} bytes, committed with {info['size']}")
            good = False
        elif full:
            digest = sha256_file(cache, f"{rel}/{name}")
            report.bytes_checked += size
            if digest != info["sha256"]:
                report.add(where, f"{rel}/{name}: sha256 mismatch (contents changed since commit)")
                good = False
        report.files_checked += 1
    return good


def check_plan_files(cache: CacheFS, plan: Plan, full: bool = True) -> list[str]:
    """Problems of the small files plan.json records (config.json, tokenizer/*): missing, another size, or
    (`full`) other contents. A handful of small files: each is looked up by name, never by a listing."""
    from sad_pipe.storage.writer import sha256_file

    problems = []
    for name, info in sorted(plan.files.items()):
        try:
            size = cache.size(name)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != info["size"]:
            problems.append(f"{name}: {size} bytes, the plan says {info['size']}")
        elif full and sha256_file(cache, name) != info["sha256"]:
            problems.append(f"{name}: sha256 mismatch (contents changed since the plan was made)")
    return problems


def _check_arrays(cache: CacheFS, rel: str, specs: list[ArraySpec], sequences: tuple[int, int], max_length: int,
                  vocab: int, values: str, report: VerifyReport, where: str) -> None:
    """Decode every chunk of every array and check shape, range and finiteness. Problems name the
    split's sequence numbers, as the plan and the index count them."""
    import zarr

    first, rows = sequences[0], sequences[1] - sequences[0]
    try:
        group = zarr.open_group(store=cache.zarr_store(rel, read_only=True), mode="r", zarr_format=3)
    except Exception as exc:
        report.add(where, f"{rel}: cannot open ({type(exc).__name__}: {exc})")
        return
    for spec in specs:
        try:
            arr = group[spec.name]
            expected = (rows, spec.rows(max_length), *spec.per_token)
            if tuple(arr.shape) != expected or arr.dtype != np.dtype(spec.dtype):
                report.add(where, f"{spec.name}: {arr.dtype}{list(arr.shape)}, expected {spec.dtype}{list(expected)}")
                continue
            chunk = arr.chunks[0]
            for a in range(0, rows, chunk):
                data = arr[a:a + chunk]
                problem = _value_problem(spec, data, vocab, values)
                if problem:
                    report.add(where, f"{spec.name} sequences {first + a}..{first + a + len(data) - 1}: {problem}")
                    break
        except Exception as exc:
            report.add(where, f"{spec.name}: unreadable ({type(exc).__name__}: {str(exc)[:200]})")


# Exponent bits of the 16-bit floats stored as uint16: all ones means Inf or NaN.
_EXPONENT_BITS = {"fp16": 0x7C00, "bf16": 0x7F80}


def _value_problem(spec: ArraySpec, data: np.ndarray, vocab: int, values: str) -> str | None:
    if spec.name.endswith("_ids"):  # gaps of ascending ids (codecs.py)
        ids = data.astype(np.int64).cumsum(-1)
        top = int(ids.max(initial=0))
        if top >= vocab:
            return f"index {top} >= vocab size {vocab}"
        return None
    if spec.name.endswith("_counts"):  # N draws per trained position, none at the others
        sums = data.astype(np.int64).sum(-1)
        if not np.isin(sums, (0, spec.per_token[0])).all():
            return f"draw counts summing to {int(sums[~np.isin(sums, (0, spec.per_token[0]))][0])}, not {spec.per_token[0]}"
        return None
    if spec.name == "topk_values" and values in _EXPONENT_BITS:  # (max - logit) as fp16/bf16 bits
        exponent = _EXPONENT_BITS[values]
        if np.any((data & exponent) == exponent):
            return "non-finite top-k values"
        return None
    if spec.name.startswith("hidden_") and spec.dtype == "uint16":  # bf16 bits: exponent all ones = Inf/NaN
        if np.any((data & 0x7F80) == 0x7F80):
            return "non-finite hidden state"
        return None
    if spec.name == KEPT:  # ascending positions within the sequence
        if data.shape[-1] > 1 and not (np.diff(data.astype(np.int64), axis=-1) > 0).all():
            return "kept positions not strictly ascending"
        return None
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        return "non-finite values"
    return None


def verify(url: str, full: bool = False) -> VerifyReport:
    """Check a cache (quick, or `full`): see the module docstring."""
    cache = CacheFS(url)
    report = VerifyReport(cache=url, full=full)
    plan = read_plan(cache)
    if plan is None:
        raise CacheError(f"{url}: no plan.json; not a sad-pipe cache")
    commits = _read_commits(cache, full, report)
    manifest = None
    if cache.exists("manifest.json"):
        try:
            manifest = _read_record(cache, "manifest.json", full)
            check_format(manifest, cache.path("manifest.json"))
        except CacheError as exc:
            report.add("cache", str(exc))
            manifest = None
    if full:  # plan.json has no hash of its own; the manifest holds a copy of it
        try:
            _read_record(cache, "plan.json", full)
        except CacheError as exc:
            report.add("cache", str(exc))
        if manifest is not None:
            differ = [key for key, value in plan.to_json().items() if manifest.get(key) != value]
            if differ:
                report.add("cache", f"manifest.json and plan.json differ in {', '.join(differ)}")
    max_length = plan.identity["packing"]["max_length"]
    vocab = (plan.identity["teacher"] or {}).get("vocab_size", plan.identity["tokenizer"]["size"])
    for split, info in plan.tokens.items():
        where = f"tokens/{split}"
        if _check_files(cache, info["dir"], info["files"], full, report, where) and full:
            _check_tokens(cache, info["dir"], info["sequences"], max_length, plan.identity["tokenizer"]["size"], vocab, report, where)
    for split in SPLITS:
        if split not in plan.splits:
            continue
        for shard, (a, b) in enumerate(plan.splits[split]["shards"]):
            if not plan.arrays:
                continue
            where = f"{split}/{shard}"
            record = commits.get((split, shard))
            if record is None:
                if where not in report.problems:  # else its record is there but unreadable, already said
                    report.add(where, f"no commit record ({commit_name(split, shard)})")
                continue
            report.shards_checked += 1
            if record.get("sequences") != [a, b]:
                report.add(where, f"commit covers sequences {record.get('sequences')}, the plan says {[a, b]}")
                continue
            if full and record.get("stats", {}).get("tokens") != (b - a) * max_length:
                report.add(where, f"commit record says {record.get('stats', {}).get('tokens')} tokens, the plan "
                                  f"{(b - a) * max_length}")
            try:
                cache.path(record["dir"])
            except CacheError as exc:
                report.add(where, str(exc))
                continue
            listed = manifest.get("shards", {}).get(split, []) if manifest is not None else None
            if listed is not None and (shard >= len(listed) or listed[shard] != record["dir"]):
                report.add(where, "manifest and commit record name different shard directories")
            if _check_files(cache, record["dir"], record["files"], full, report, where) and full:
                _check_arrays(cache, record["dir"], plan.arrays, (a, b), max_length, vocab, plan.identity["values"],
                              report, where)
    if manifest is not None and full:
        _check_index(cache, plan, commits, report)
    for problem in check_plan_files(cache, plan, full):  # config.json and tokenizer/: a change there is damage too
        report.add("cache", problem)
    if not cache.exists("manifest.json"):
        report.add("cache", "no manifest.json: the cache is incomplete; re-run the same cache-teacher command to finish it")
    report.complete = manifest is not None and not report.damaged_shards()
    return report


def _read_record(cache: CacheFS, rel: str, full: bool):
    """A JSON record; with `full`, also in the one form the writer gives it (storage/README.md), so an edit or
    damage that still parses (a lost newline, changed spacing) is reported too."""
    obj = cache.read_json(rel)
    if full and cache.read_bytes(rel) != (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode():
        raise CacheError(f"{rel}: not byte for byte as written (edited or damaged)")
    return obj


def _read_commits(cache: CacheFS, full: bool, report: VerifyReport) -> dict[tuple[str, int], dict]:
    """Like manifest.read_commits, but an unreadable or malformed record is a problem of its shard, not an error."""
    out = {}
    for name in cache.listdir("commits"):
        key = parse_commit_name(name)
        if key is None:
            continue
        split, num = key
        try:
            record = _read_record(cache, f"commits/{name}", full)
            if not (isinstance(record, dict) and record.get("split") == split and record.get("shard") == num
                    and isinstance(record.get("dir"), str) and isinstance(record.get("files"), dict)
                    and all(isinstance(f, dict) and {"size", "sha256"} <= set(f) for f in record["files"].values())):
                raise CacheError(f"commits/{name}: not a commit record of {split}/{num}")
        except CacheError as exc:
            report.add(f"{split}/{num}", str(exc))
            continue
        out[key] = record
    return out


def _check_tokens(cache, rel, rows, max_length, tokenizer_size, vocab, report, where) -> None:
    import zarr

    try:
        arr = zarr.open_array(store=cache.zarr_store(f"{rel}/input_ids", read_only=True), mode="r")
        if tuple(arr.shape) != (rows, max_length):
            report.add(where, f"input_ids shape {list(arr.shape)}, expected {[rows, max_length]}")
            return
        for a in range(0, rows, arr.chunks[0] * 64):
            top = int(arr[a:a + arr.chunks[0] * 64].max(initial=0))
            if top >= max(tokenizer_size, vocab):
                report.add(where, f"token id {top} >= vocab size {max(tokenizer_size, vocab)}")
                return
    except Exception as exc:
        report.add(where, f"input_ids unreadable ({type(exc).__name__}: {str(exc)[:200]})")


def _check_index(cache: CacheFS, plan: Plan, commits: dict, report: VerifyReport) -> None:
    """A checksummed read with the plan's row count, then the file itself against the one finalize would write
    now: Parquet checksums its pages but not its footer (statistics, schema), so a flip there reads silently.
    A file from another pyarrow version differs in its footer anyway; then only the rows are compared."""
    import io

    import pyarrow.parquet as pq

    from sad_pipe.storage.writer import index_bytes

    for split, info in plan.splits.items():
        rel = f"index/{split}.parquet"
        try:
            raw = cache.read_bytes(rel)
            table = pq.read_table(io.BytesIO(raw), page_checksum_verification=True)
            if table.num_rows != info["sequences"]:
                report.add("cache", f"{rel}: {table.num_rows} rows, the plan has {info['sequences']}")
                continue
            expected = index_bytes(cache, plan, split, commits)
            if raw != expected:
                versions = {pq.ParquetFile(io.BytesIO(b)).metadata.created_by for b in (raw, expected)}
                if len(versions) == 1 or not table.equals(pq.read_table(io.BytesIO(expected))):
                    report.add("cache", f"{rel}: differs from the index the plan and the commit records give")
        except Exception as exc:
            report.add("cache", f"{rel}: unreadable ({type(exc).__name__}: {str(exc)[:200]})")


def drop_shards(url: str, shards: list[tuple[str, int]]) -> None:
    """Un-commit damaged shards (and the manifest) so the next cache-teacher run re-creates them whole."""
    cache = CacheFS(url)
    commits = _read_commits(cache, False, VerifyReport(url, False))  # a damaged record is simply dropped
    cache.remove("manifest.json")
    for split, shard in shards:
        record = commits.get((split, shard))
        cache.remove(commit_name(split, shard))
        if record is not None:  # else its directory is garbage now: the next run's gc removes it
            try:
                cache.remove(record["dir"])
            except CacheError:  # a record naming a path outside the cache: never delete there
                log.warning("repair: %s names %r, outside the cache; left alone", commit_name(split, shard), record["dir"])


# What a cache-teacher run creates in its directory before plan.json exists (plus `*.partial` files).
UNPLANNED_ENTRIES = ("_tmp", "tokens", "commits", "shards", "tokenizer", "config.json", BASIS_FILE)


def holds_only_unplanned_leftovers(cache: CacheFS) -> bool:
    """True for a directory without plan.json holding nothing but what a cache-teacher run killed before
    creating its plan leaves behind (an empty or absent directory included)."""
    return not cache.exists("plan.json") and all(n in UNPLANNED_ENTRIES or n.endswith(".partial") for n in cache.listdir(""))


def collect_garbage(cache: CacheFS, *, unplanned: bool = False) -> dict:
    """Delete temporary files and shard/token directories that no commit or plan names.

    Refuses a directory without plan.json: it is no cache, and what looks like leftovers there may be
    someone else's files. `unplanned=True` is cache-teacher's start-up, which may clean a cache whose
    first run died before its plan, once `holds_only_unplanned_leftovers` says that is all it holds.
    Never run it while a cache-teacher run writes to the same cache: its work in progress is garbage too.
    Returns {"removed": [paths], "bytes": freed}."""
    plan = read_plan(cache)
    if plan is None and not (unplanned and holds_only_unplanned_leftovers(cache)):
        raise CacheError(f"{cache.url}: no plan.json, not a sad-pipe cache; gc deletes only inside a cache "
                         "(re-running cache-teacher cleans up after a run that stopped before its plan)")
    removed, freed = [], 0
    keep = {r["dir"] for r in read_commits(cache).values()}
    if plan is not None:
        keep |= {t["dir"] for t in plan.tokens.values()}
    candidates = [f"_tmp/{n}" for n in cache.listdir("_tmp")]
    for split in SPLITS:
        candidates += [f"shards/{split}/{n}" for n in cache.listdir(f"shards/{split}")]
    candidates += [f"tokens/{n}" for n in cache.listdir("tokens")]
    for top in ("", "commits", "tokenizer", "index"):
        candidates += [f"{top}/{n}".lstrip("/") for n in cache.listdir(top) if n.endswith(".partial")]
    for rel in candidates:
        if rel in keep:
            continue
        try:
            size = sum(cache.walk_files(rel).values()) if not rel.endswith(".partial") else cache.size(rel)
        except (FileNotFoundError, CacheError):  # gone, or holding a link out of the cache: removed, not followed
            size = 0
        cache.remove(rel)
        removed.append(rel)
        freed += size
    if removed:
        log.info("gc: removed %d leftovers (%d bytes)", len(removed), freed)
    return {"removed": removed, "bytes": freed}


def compressed_bytes_per_token(arrays: dict[str, np.ndarray], specs: list[ArraySpec], chunk_rows: int,
                               max_length: int | None = None) -> dict[str, float]:
    """Encode sample arrays [n, T, ...] exactly as a shard would and measure bytes per token (of max_length
    tokens per sequence; by default the arrays' second axis, which an array of kept positions only is not)."""
    from sad_pipe.storage.writer import write_group

    with tempfile.TemporaryDirectory() as tmp:
        cache = CacheFS(tmp)
        write_group(cache, "sample", arrays, specs, chunk_rows)
        sizes = cache.walk_files("sample")
    out = {}
    for spec in specs:
        n_tokens = arrays[spec.name].shape[0] * (max_length or arrays[spec.name].shape[1])
        out[spec.name] = sum(v for k, v in sizes.items() if k.split("/", 1)[0] == spec.name) / n_tokens
    return out
