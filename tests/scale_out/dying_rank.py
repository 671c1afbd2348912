"""torchrun target for the killed-rank test: the sad-pipe CLI, except that rank 1 SIGKILLs itself when it is
about to commit its second shard (after the shard directory was moved into place, before its commit record).

    torchrun --standalone --nproc-per-node 2 tests/scale_out/dying_rank.py cache-teacher --config ...
"""

from __future__ import annotations

import os
import signal
import sys

from sad_pipe.storage.fs import CacheFS

if os.environ.get("RANK") == "1":
    real_create = CacheFS.create_if_absent
    commits: list[str] = []

    def create_if_absent(self, rel: str, data: bytes) -> bool:
        if rel.startswith("commits/"):
            commits.append(rel)
            if len(commits) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_create(self, rel, data)

    CacheFS.create_if_absent = create_if_absent

if __name__ == "__main__":
    from sad_pipe.cli import main

    main(["-q", *sys.argv[1:]])
