"""Loss weights as a function of training progress (fraction of planned optimizer steps).

Phases hold weights until their `until`; a phase with `ramp` > 0 starts by moving linearly from the
previous phase's weights over that much progress. Train and eval at the same step call the same
function, so their losses are comparable (the original trainer's 6x train/eval gap came from eval ignoring it).
"""

from __future__ import annotations

from sad_pipe.pipeline.config import COMPONENTS, CurriculumConfig


def curriculum_weights(progress: float, cfg: CurriculumConfig) -> dict[str, float]:
    """{component: weight} at `progress` in [0, 1]. A weight that is 0 here is exactly 0.0."""
    if not cfg.use_curriculum:
        return {c: float(getattr(cfg.weights, c)) for c in COMPONENTS}
    previous = None
    start = 0.0
    for phase in cfg.phases:
        if progress < phase.until or phase is cfg.phases[-1]:
            target = {c: float(getattr(phase, c)) for c in COMPONENTS}
            if previous is None or phase.ramp <= 0 or progress >= start + phase.ramp:
                return target
            frac = max(0.0, (progress - start) / phase.ramp)
            return {c: previous[c] + (target[c] - previous[c]) * frac for c in COMPONENTS}
        previous = {c: float(getattr(phase, c)) for c in COMPONENTS}
        start = phase.until
    raise AssertionError("unreachable: the last phase always matches")


def step_weights(step: int, total_steps: int, cfg: CurriculumConfig) -> dict[str, float]:
    """Weights for optimizer step `step` (0-based) of `total_steps`."""
    return curriculum_weights(step / max(total_steps, 1), cfg)


def active_step_ranges(cfg: CurriculumConfig, total_steps: int) -> dict[str, list[tuple[int, int]]]:
    """{component: [(first_step, stop_step), ...]} where its weight is non-zero."""
    out: dict[str, list[tuple[int, int]]] = {c: [] for c in COMPONENTS}
    for c in COMPONENTS:
        start = None
        for step in range(total_steps + 1):
            on = step < total_steps and step_weights(step, total_steps, cfg)[c] > 0
            if on and start is None:
                start = step
            elif not on and start is not None:
                out[c].append((start, step))
                start = None
    return out


def phase_table(cfg: CurriculumConfig, total_steps: int) -> list[dict]:
    """The phases as optimizer-step ranges with their weights at start and end (for the plan)."""
    if not cfg.use_curriculum:
        return [{"phase": 1, "steps": [0, total_steps], "weights": step_weights(0, total_steps, cfg)}]
    rows, start = [], 0
    for i, phase in enumerate(cfg.phases):
        # The first step whose progress reaches `until`, found with the same division curriculum_weights
        # uses (round(until * total) disagrees with it, e.g. until 0.3 of 7 steps: 2 vs 3).
        stop = total_steps if i == len(cfg.phases) - 1 else next(
            s for s in range(start, total_steps + 1) if s == total_steps or s / total_steps >= phase.until)
        if stop > start:
            rows.append({"phase": i + 1, "steps": [start, stop], "weights_start": step_weights(start, total_steps, cfg),
                         "weights_end": step_weights(stop - 1, total_steps, cfg)})
        start = stop
    return rows
