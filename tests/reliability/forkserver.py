"""A fork server: imports torch, transformers and sad-pipe once, then forks one child per command, so a
test can SIGKILL hundreds of real `sad-pipe` processes without paying the imports each time.

Run as a script (`python forkserver.py LOG`); `ForkServer` below drives it over JSON lines on stdin/stdout.
Each request runs `sad-pipe ARGS` in a fresh child (the real click entry point, stdout/stderr to a log
file) and answers how it ended:
    kill_after   SIGKILL the child that many seconds after the fork (if it is still running)
    crash        {"target": "module:attr.attr", "call": n, "when": "before"|"after"}: the child SIGKILLs
                 itself at the n-th call of that function, before or after it runs (a crash point)
    count        ["module:attr", ...]: the child writes how often each was called to count_file at exit
    record_ids   a file: the child appends one JSON line per training micro-batch (epoch, micro_batch,
                 sequence ids) and one per resume (the checkpoint's step and data position)
A child never cleans up after a kill: what it leaves is what a crashed process leaves.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import time


def _resolve(target: str):
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _wrap(target: str, before=None, after=None, patch=setattr) -> None:
    """Replace `target` by a wrapper calling before(args, kwargs) / after(args, kwargs, result) around it;
    `patch` is setattr (a child) or pytest's monkeypatch.setattr (in-process, undone after the test)."""
    owner, name = _resolve(target)
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if before:
            before(args, kwargs)
        out = original(*args, **kwargs)
        if after:
            after(args, kwargs, out)
        return out

    patch(owner, name, wrapper)


def install_recorder(path: str, patch=setattr) -> None:
    """Append to `path` one JSON line per run start, per resume (the checkpoint's step and data position) and
    per training micro-batch (epoch, micro_batch, sequence ids). `effective_trace` turns them into the
    sample order the finished run trained on."""
    def note(record: dict) -> None:
        with open(path, "a") as f:  # one short write per line: a SIGKILL cannot tear it
            f.write(json.dumps(record) + "\n")

    def started(args, kwargs, setup):
        note({"start": True})

    def batch(args, kwargs):
        model = args[3] if len(args) > 3 else kwargs.get("model")
        if model is None:  # a training micro-batch (evaluation passes the bare model)
            b = args[1]
            note({"epoch": int(b["epoch"]), "micro_batch": int(b["micro_batch"]), "ids": b["sequence_ids"].tolist()})

    def resumed(args, kwargs, state):
        note({"resume": state["step"], "epoch": state["epoch"], "micro_batch": state["next_micro_batch"]})

    train = "sad_pipe.stages.train_student.train"
    _wrap(f"{train}:setup", after=started, patch=patch)
    _wrap(f"{train}:batch_losses", before=batch, patch=patch)
    _wrap(f"{train}:load_checkpoint", after=resumed, patch=patch)


def effective_trace(path: str) -> list[tuple[int, int, tuple[int, ...]]]:
    """The (epoch, micro_batch, ids) a run trained on, in order, across kills and resumes: a resume drops what
    the killed run did past its checkpoint; a run that found no checkpoint starts the trace over."""
    trace: list = []
    fresh = False
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "start" in r:
                fresh = True
            elif "resume" in r:
                fresh = False
                trace = [t for t in trace if (t[0], t[1]) < (r["epoch"], r["micro_batch"])]
            else:
                if fresh:
                    trace, fresh = [], False
                trace.append((r["epoch"], r["micro_batch"], tuple(r["ids"])))
    return trace


def _die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


def _install(hooks: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for target in hooks.get("count", []):
        counts[target] = 0

        def count(args, kwargs, target=target):
            counts[target] += 1

        _wrap(target, before=count)
    crash = hooks.get("crash")
    if crash:
        calls = [0]

        def maybe_die(*_):
            calls[0] += 1
            if calls[0] == crash["call"]:
                _die()

        _wrap(crash["target"], **{crash["when"]: maybe_die})
    if hooks.get("record_ids"):
        install_recorder(hooks["record_ids"])
    return counts


def _child(request: dict) -> None:
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        counts = _install(request.get("hooks", {}))
        from sad_pipe.cli import main

        try:
            main.main(args=request["args"], prog_name="sad-pipe", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        if request.get("hooks", {}).get("count_file"):
            with open(request["hooks"]["count_file"], "w") as f:
                json.dump(counts, f)
    except BaseException:  # noqa: BLE001 - report, never return into the server loop
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Everything a child needs, imported before any thread exists (no torch op runs here).
    import datasets  # noqa: F401
    import torch
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import zarr  # noqa: F401

    import sad_pipe.cli  # noqa: F401
    import sad_pipe.stages.cache_teacher  # noqa: F401
    import sad_pipe.stages.train_student.train  # noqa: F401
    import sad_pipe.storage.verify  # noqa: F401

    torch.set_num_threads(1)
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline = None if request.get("kill_after") is None else start + request["kill_after"]
        killed = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.perf_counter() >= deadline and not killed:
                os.kill(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.001)
        signaled = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        answer = {"pid": pid, "killed": signaled, "code": None if signaled else os.waitstatus_to_exitcode(status),
                  "seconds": time.perf_counter() - start}
        print(json.dumps(answer), file=out, flush=True)


def other_hash_seed(names: tuple[str, ...]) -> str:
    """A PYTHONHASHSEED under which a set of `names` iterates in another order than in this process. String
    hashes, hence set order, change with the seed: a result that depends on set order differs between a child
    of the server and the test process, instead of agreeing by accident."""
    mine = list(set(names))
    probe = f"print(list(set({list(names)!r})))"
    for seed in range(1, 100):
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                             capture_output=True, text=True, check=True).stdout.strip()
        if out != repr(mine):
            return str(seed)
    raise AssertionError("no seed changes the order")


class ForkServer:
    """The test side: `run(args, ...)` forks one sad-pipe child and returns how it ended. The server runs under
    another string-hash seed than this process (see other_hash_seed): each kill and resume is a new process in
    real life, so a run must not depend on the seed."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self.runs = 0
        self.stderr = open(os.path.join(log_dir, "server.log"), "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
                                     env={**os.environ, "OMP_NUM_THREADS": "1",
                                          "PYTHONHASHSEED": other_hash_seed(("kd", "ce", "feature", "relation"))})
        self.ready = False  # the imports (seconds) overlap whatever the test does first

    def _wait_ready(self) -> None:
        if not self.ready:
            line = self.proc.stdout.readline()
            assert line and json.loads(line)["ready"], open(os.path.join(self.log_dir, "server.log")).read()[-3000:]
            self.ready = True

    def run(self, args: list[str], *, kill_after: float | None = None, hooks: dict | None = None) -> dict:
        self._wait_ready()
        self.runs += 1
        log = os.path.join(self.log_dir, f"run-{self.runs:04d}.log")
        self.proc.stdin.write(json.dumps({"args": args, "kill_after": kill_after, "hooks": hooks or {}, "log": log}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died; see " + os.path.join(self.log_dir, "server.log")
        answer = json.loads(line)
        answer["log"] = log
        return answer

    def output(self, answer: dict) -> str:
        with open(answer["log"]) as f:
            return f.read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.close()


if __name__ == "__main__":
    _serve()
