"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512), as PEFT implements it (``AdaLoraModel``, ``RankAllocator``).

Each targeted Linear gets an SVD-form adapter ΔW = scale · P (Λ ⊙ Q): P = up (out, r), Λ = singular (r, 1),
Q = down (r, in); P, Q ~ N(0, 0.02²), Λ = 0, scale = alpha / r (r the initial rank, kept for the whole run as
PEFT's ``ranknum``). Training adds the orthogonality regulariser R = mean over P and Q of ‖PᵀP − I‖_F and
‖QQᵀ − I‖_F, times ``orth_reg``, to the loss. After every optimizer step the importance of each parameter entry is
updated from I = |θ · ∇θ|: Ī ← β₁ Ī + (1 − β₁) I (sensitivity), Ū ← β₂ Ū + (1 − β₂) |I − Ī| (uncertainty),
score s = Ī · Ū; triplet i of a module scores s(Λᵢ) + mean s(Qᵢ,:) + mean s(P:,ᵢ). The budget (total rank over
all modules) stays at its initial value for the warm-up steps, falls as a cubic to the target over the budgeting
steps, and holds for the final steps; on a masking step (every ``interval`` steps while budgeting, every step in the
final phase) Λ entries whose score is at or below the k-th smallest (k = initial − budget) are set to zero.

Exported as plain LoRA with a rank per module: the kept triplets, Λ folded into down; a module with no triplet
left is not written. The stored alpha is scale · r', so alpha / r' loaders (ComfyUI, kohya) render the same ΔW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import BLoRAError
from ..adapters.kinds.base import ModuleAdapter
from ..adapters.kinds.lora import LoRA
from ..adapters.trainable import Trainable

BETA1 = BETA2 = 0.85  # PEFT AdaLoraConfig defaults
INIT_STD = 0.02


class TrainableSVD(Trainable):
    """SVD-form adapter W' = W + scale · up @ (singular ⊙ down). Exports as ``lora`` (module doc)."""

    kind = LoRA.name
    plus = ("up",)
    factored = True

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator) -> "TrainableSVD":
        out_features, in_features = weight.shape
        tensors = {"down": torch.randn(rank, in_features, generator=generator) * INIT_STD,
                   "up": torch.randn(out_features, rank, generator=generator) * INIT_STD,
                   "singular": torch.zeros(rank, 1)}
        return cls({n: t.to(weight.device) for n, t in tensors.items()}, scale)

    @classmethod
    def build(cls, tensors, scale: float, magnitude: torch.Tensor | None = None) -> "TrainableSVD":
        """From a saved LoRA module (resume): P = up, Q = down, Λ = 1, so the delta is the file's."""
        if magnitude is not None:
            raise BLoRAError("an AdaLoRA run cannot continue from a DoRA file")
        down = tensors["down"]
        return cls({"down": down, "up": tensors["up"], "singular": torch.ones(down.shape[0], 1).to(down)}, scale)

    @property
    def capacity(self) -> int:
        """Triplets allocated (the rank the run started this module with)."""
        return int(self.singular.shape[0])

    @property
    def rank(self) -> int:
        """Triplets still in use (Λ ≠ 0)."""
        return int((self.singular.detach() != 0).sum())

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up @ (self.down * self.singular))

    def apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """((x Qᵀ) ⊙ Λ) Pᵀ: rank-r work per row."""
        linear = torch.nn.functional.linear
        hidden = linear(x, self.down.to(x.dtype)) * self.singular.reshape(-1).to(x.dtype)
        return linear(hidden, self.up.to(x.dtype))

    def orthogonality(self) -> torch.Tensor:
        """‖PᵀP − I‖_F + ‖QQᵀ − I‖_F (two of the regulariser's terms)."""
        p, q = self.up, self.down
        eye = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)
        return torch.linalg.matrix_norm(p.T @ p - eye) + torch.linalg.matrix_norm(q @ q.T - eye)

    def export(self, alpha: float | None = None, dtype: torch.dtype = torch.float32) -> ModuleAdapter | None:
        """The kept triplets as a plain LoRA (Λ folded into down), stored alpha scale · r'; None when none is kept.
        ``alpha`` is ignored (the stored alpha follows from the kept rank)."""
        keep = (self.singular.detach() != 0).reshape(-1)
        r = int(keep.sum())
        if r == 0:
            return None
        down = (self.down.detach() * self.singular.detach())[keep]
        up = self.up.detach()[:, keep]
        return ModuleAdapter(LoRA.name, {"down": down.to(dtype).clone(), "up": up.to(dtype).clone()},
                             alpha=self.scale * r)


@dataclass(frozen=True)
class Budget:
    """The total rank allowed at one step, and whether the step masks down to it."""

    total: int
    mask: bool


@dataclass(frozen=True)
class BudgetSchedule:
    """initial → target total rank over ``steps``: ``warmup`` steps at initial, cubic fall, ``final`` steps at
    target; masking every ``interval`` steps while falling, every step in the final phase (PEFT's schedule)."""

    initial: int
    target: int
    steps: int
    warmup: int
    final: int
    interval: int

    def at(self, step: int) -> Budget:
        """Budget after optimizer step ``step`` (1-based)."""
        if step <= self.warmup:
            return Budget(self.initial, False)
        if step > self.steps - self.final:
            return Budget(self.target, True)
        span = max(1, self.steps - self.final - self.warmup)
        progress = 1.0 - (step - self.warmup) / span
        total = int((self.initial - self.target) * progress ** 3 + self.target)
        return Budget(total, step % self.interval == 0)


class RankAllocator:
    """Importance scores of every SVD adapter and the masking to a budget (module doc)."""

    def __init__(self, adapters: Mapping[str, TrainableSVD], schedule: BudgetSchedule, orth_reg: float):
        self.adapters = dict(adapters)
        self.schedule = schedule
        self.orth_reg = float(orth_reg)
        self.sensitivity: dict[int, torch.Tensor] = {}
        self.uncertainty: dict[int, torch.Tensor] = {}
        self.final_mask: dict[str, torch.Tensor] | None = None

    def regulariser(self) -> torch.Tensor | None:
        """orth_reg · the mean orthogonality term over P and Q of every module (None when orth_reg is 0)."""
        if self.orth_reg == 0.0:
            return None
        terms = torch.stack([a.orthogonality() for a in self.adapters.values()])
        return self.orth_reg * terms.sum() / (2 * len(self.adapters))

    @torch.no_grad()
    def update(self, step: int) -> Budget:
        """After optimizer step ``step`` (grads still present): update scores, mask to the step's budget."""
        for a in self.adapters.values():
            for p in (a.down, a.up, a.singular):
                if p.grad is None:
                    continue
                importance = (p * p.grad).abs()
                key = id(p)
                if key not in self.sensitivity:
                    self.sensitivity[key] = torch.zeros_like(p)
                    self.uncertainty[key] = torch.zeros_like(p)
                s, u = self.sensitivity[key], self.uncertainty[key]
                s.mul_(BETA1).add_(importance, alpha=1 - BETA1)
                u.mul_(BETA2).add_((importance - s).abs(), alpha=1 - BETA2)
        budget = self.schedule.at(step)
        if budget.mask:
            self._mask(budget.total, final=step > self.schedule.steps - self.schedule.final)
        return budget

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        key = id(p)
        if key not in self.sensitivity:
            return torch.zeros_like(p)
        return self.sensitivity[key] * self.uncertainty[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """path -> (r,) score of each triplet: s(Λᵢ) + mean s(Qᵢ,:) + mean s(P:,ᵢ)."""
        return {path: (self._score(a.singular).reshape(-1) + self._score(a.down).mean(dim=1)
                       + self._score(a.up).mean(dim=0))
                for path, a in self.adapters.items()}

    def _mask(self, budget: int, final: bool) -> None:
        if final and self.final_mask is not None:  # the final pattern, fixed once reached (PEFT's rank_pattern)
            for path, a in self.adapters.items():
                a.singular.masked_fill_(self.final_mask[path], 0.0)
            return
        scores = self.triplet_scores()
        k = self.schedule.initial - budget
        if k <= 0:
            return
        threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores.values()]), k).values
        masks = {path: (s.float().cpu() <= threshold).reshape(-1, 1).to(self.adapters[path].singular.device)
                 for path, s in scores.items()}
        for path, a in self.adapters.items():
            a.singular.masked_fill_(masks[path], 0.0)
        if final:
            self.final_mask = masks

    def ranks(self) -> dict[str, int]:
        return {path: a.rank for path, a in self.adapters.items()}


def budget_schedule(initial: int, num_modules: int, target_rank: int, steps: int, warmup: float, final: float,
                    interval: int) -> BudgetSchedule:
    """The budget schedule of a run: ``initial`` total rank (rank · modules, or a resumed file's sum) → target
    rank · modules (never above initial); warmup and final are fractions of the steps."""
    return BudgetSchedule(initial=initial, target=min(initial, target_rank * num_modules), steps=steps,
                          warmup=int(math.floor(warmup * steps)), final=int(math.floor(final * steps)),
                          interval=max(1, interval))
