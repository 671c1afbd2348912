"""Where train-student's metrics go: metrics.jsonl always, and the trackers of `train.report_to`.

Every line of metrics.jsonl goes to each tracker too, as scalars at the line's optimizer step, tagged
`<split>/<key>` (`train/loss/kd`, `eval/ce`, `eval/weight/kd`); lists and text (skipped sequence ids) stay in
the JSONL only. One run directory is one tracker run:
    tensorboard  event files in <run>/tensorboard (torch's SummaryWriter); a resumed run purges the events
                 past its checkpoint, as metrics.jsonl drops its lines past it
    wandb        a run in <run>/wandb, its id kept in <run>/wandb-id so a resume continues the same run
                 (WANDB_MODE=offline works as usual: `wandb sync` uploads it later)
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from sad_pipe.errors import ConfigError

TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # name: (module, extra)


def check_trackers(report_to: list[str]) -> None:
    """Refuse, before any work, a tracker whose package is not installed."""
    import importlib.util

    missing = [name for name in report_to if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None]
    if missing:
        extras = ",".join(TRACKERS[name][1] for name in missing)
        raise ConfigError(f"train.report_to {', '.join(missing)}: not installed; pip install -e \".[{extras}]\" "
                          "(or drop it from train.report_to)")


def json_line(record: dict) -> str:
    """One strict-JSON line: a non-finite figure (a skipped step's loss) is written as null, not NaN."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean) + "\n"


def scalars(record: dict) -> dict[str, float]:
    """A metrics line's figures as tracker tags: `<split>/<key>`, without the step itself or non-numbers."""
    split = record["split"]
    out = {}
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, (str, list, dict)) or value is None:
            continue
        out[key if key.startswith(f"{split}/") else f"{split}/{key}"] = float(value)
    return out


class MetricsLog:
    """metrics.jsonl plus the configured trackers. On resume, lines past `resume_step` (and a final eval, redone
    at the end) are dropped, so the trace equals an uninterrupted run's."""

    def __init__(self, run_dir: Path, resume_step: int, report_to: list[str], config: dict):
        self.path = run_dir / "metrics.jsonl"
        _drop_lines_after(self.path, resume_step)
        self.jsonl = open(self.path, "a", buffering=1)
        self.tensorboard = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        if "wandb" in report_to:
            import wandb

            id_file = run_dir / "wandb-id"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12] + "\n")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "sad-pipe"), name=run_dir.name,
                                    id=id_file.read_text().strip(), resume="allow", dir=str(run_dir), config=config)

    def write(self, record: dict) -> None:
        self.jsonl.write(json_line(record))
        figures = scalars(record)
        if self.tensorboard is not None:
            for tag, value in figures.items():
                self.tensorboard.add_scalar(tag, value, global_step=record["step"])
        if self.wandb is not None:
            self.wandb.log(figures, step=record["step"])

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_lines_after(path: Path, resume_step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
        if row["step"] <= resume_step and not row.get("final"):
            keep.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")  # replaced atomically: a kill here keeps the old trace
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
