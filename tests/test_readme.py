"""The README's code examples run as they stand (on the tests' small cache instead of the demo's)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(section: str) -> str:
    """The first ```python block under the README heading `section`."""
    text = README.read_text()
    body = text[text.index(f"## {section}\n"):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_the_cache_in_your_own_stack_example_trains_a_student(kd_cache):
    code = python_block("The cache in your own stack").replace('"runs/demo/cache"', repr(kd_cache))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    steps = re.findall(r"step (\d+): kd ([\d.]+) ce ([\d.]+) top-1 agreement ([\d.]+)", out.getvalue())
    assert [int(s[0]) for s in steps] == list(range(20))
    kd, ce = ([float(s[i]) for s in steps] for i in (1, 2))
    # finite throughout; the hybrid value is KL to the drawn target, so it holds the draws' own spread on top of the
    # true KL (a constant offset with no gradient): ~2.6 on the tests' nearly flat random teacher
    assert all(0 < k < 10 for k in kd)
    assert sum(ce[-5:]) / 5 < sum(ce[:5]) / 5 - 0.3  # the student trains
