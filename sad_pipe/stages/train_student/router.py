"""Student-aware layer routing for feature matching.

Each matched student layer gets a projection to the teacher's width and a router: a small linear
gate on the student's own (mean-pooled) states that decides, per sequence, how to mix the cached
teacher layers into its target. A fixed layer map (router off) pairs layers by relative depth.
"""

from __future__ import annotations

import torch
from torch import nn

from sad_pipe.stages.train_student.losses import standardize


class LayerRouter(nn.Module):
    """per_layer (a low-rank cache: every teacher layer has its own R-dimensional basis): each matched student
    layer gets one projection into each teacher layer's basis, [d_student -> R], and the router mixes the
    per-layer losses (losses.routed_feature_loss) instead of the targets, whose coordinates differ by layer.
    Nothing is decoded to the teacher's width."""

    def __init__(self, student_width: int, teacher_width: int, n_student: int, n_teacher: int, *,
                 learned: bool, project: bool, fixed_map: list[int], per_layer: bool = False):
        super().__init__()
        self.learned = learned
        self.n_teacher = n_teacher
        self.per_layer = per_layer
        self.register_buffer("fixed_map", torch.tensor(fixed_map, dtype=torch.long), persistent=False)
        if per_layer:
            self.projections = nn.ModuleList(
                nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in range(n_teacher))
                for _ in range(n_student))
        else:
            self.projections = nn.ModuleList(
                nn.Linear(student_width, teacher_width, bias=False) if project else nn.Identity() for _ in range(n_student)
            )
        # Zero-initialised gates route uniformly at first; learning moves them.
        self.gates = nn.ModuleList(nn.Linear(student_width, n_teacher) for _ in range(n_student)) if learned else None
        if self.gates is not None:
            for gate in self.gates:
                nn.init.zeros_(gate.weight)
                nn.init.zeros_(gate.bias)

    def forward(self, student_states: list[torch.Tensor], teacher_states: list[torch.Tensor], mask: torch.Tensor):
        """student_states: S x [B, T, Ds]; teacher_states: L x [B, T, Dt] (decoded cache); mask [B, T].

        Returns (projected: S x [B, T, Dt], targets: S x [B, T, Dt] standardised, routing [S, B, L]); per_layer:
        (projected: S x {teacher layer j: [B, T, R]} (every j when learned, else the mapped one), targets:
        L x [B, T, R] standardised, routing [S, B, L])."""
        weights_mask = mask.unsqueeze(-1).float()
        if self.per_layer:
            targets = [standardize(h) for h in teacher_states]
            projected = [{j: self.projections[s][j](h) for j in (range(self.n_teacher) if self.learned
                                                                  else [int(self.fixed_map[s])])}
                         for s, h in enumerate(student_states)]
            return projected, targets, torch.stack([self._alpha(s, h, weights_mask) for s, h in enumerate(student_states)])
        teacher = torch.stack([standardize(h) for h in teacher_states], dim=1)  # [B, L, T, Dt]
        projected, targets, routing = [], [], []
        for s, h in enumerate(student_states):
            projected.append(self.projections[s](h))
            alpha = self._alpha(s, h, weights_mask)
            routing.append(alpha)
            targets.append(torch.einsum("bl,bltd->btd", alpha, teacher))
        return projected, targets, torch.stack(routing)

    def _alpha(self, s: int, h: torch.Tensor, weights_mask: torch.Tensor) -> torch.Tensor:
        """Student layer s's weights over the teacher layers [B, L]."""
        if self.learned:
            pooled = (h.float() * weights_mask).sum(1) / weights_mask.sum(1).clamp_min(1)
            return torch.softmax(self.gates[s](pooled.to(self.gates[s].weight.dtype)).float(), dim=-1)
        return nn.functional.one_hot(self.fixed_map[s], self.n_teacher).float().expand(h.shape[0], -1)
