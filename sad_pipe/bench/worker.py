"""One measurement in a fresh interpreter: `python -m sad_pipe.bench.worker JOB.json OUT.json`.

A job names a function `fn(args: dict, meter: MemoryMeter) -> dict`. The function does its imports
and builds its inputs, calls `meter.start()` right before the work it measures, and returns figures;
the worker adds the meter's report. A fresh process per variant keeps one variant's peak from
hiding in another's (an allocator rarely gives memory back to the OS).

Peak memory:
  CPU   the kernel's high-water mark of this process's resident set (VmHWM). `start()` resets it
        (/proc/self/clear_refs, Linux >= 4.0) and takes the resident set then as the baseline; the
        report gives the process's total peak (imports included) and the peak above that baseline.
        (getrusage's ru_maxrss is not used: on Linux it carries the parent's peak across exec.)
  CUDA  torch.cuda.max_memory_allocated after reset_peak_memory_stats; the baseline is what was
        allocated at `start()` (model weights, inputs).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    def __init__(self, device: str):
        self.device = device
        self.report: dict = {}
        self._started = False

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.report = {"method": "torch.cuda.max_memory_allocated", "baseline": torch.cuda.memory_allocated()}
        else:
            before = _proc_status_kib("VmHWM")
            reset = True
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set
            except OSError:
                reset = False
            self.report = {"method": "VmHWM (peak resident set)" + ("" if reset else ", not resettable"),
                           "baseline": (_proc_status_kib("VmRSS") or 0) * 1024,
                           "peak_before_start": (before or 0) * 1024}
        self._started = True

    def stop(self) -> dict:
        if not self._started:
            raise RuntimeError("MemoryMeter.stop() before start()")
        if "total_peak" in self.report:  # already stopped by the job (before it wrote its outputs)
            return self.report
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.report.update(total_peak=peak, above_baseline=peak - self.report["baseline"])
        else:
            peak = (_proc_status_kib("VmHWM") or 0) * 1024
            self.report.update(total_peak=max(peak, self.report["peak_before_start"]),
                               above_baseline=peak - self.report["baseline"])
        return self.report


def main(argv: list[str]) -> None:
    job = json.loads(Path(argv[0]).read_text())
    module, name = job["target"].split(":")
    fn = getattr(importlib.import_module(module), name)
    meter = MemoryMeter(job["device"])
    result = fn(job["args"], meter)
    report = meter.stop() if meter._started else {}
    Path(argv[1]).write_text(json.dumps({"result": result, "memory": report}))


if __name__ == "__main__":
    main(sys.argv[1:])
