"""Catch the first NaN/Inf gradient at the step it happens, on the device, without a host sync.

Every optimizer step: one fused L2-norm reduction over the gradients (`torch._foreach_norm`; a NaN or Inf makes
the norm non-finite, and so does a norm beyond float32's range, 1.8e19, which is a NaN a step later), and
device-side bookkeeping of the first step that had a non-finite gradient and which
groups had one then. The host reads these at the next logged step; only `on_nonfinite="stop" | "skip_step"`
reads the flag every step (one sync per step, the price of acting before the optimizer does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from trainwatch.probes.gradients import gradients, norms


class NonfiniteWatch:
    """Device state: `first_step` (−1 until a non-finite gradient is seen) and `first_groups` (bool per group)."""

    def __init__(self, params: Sequence[nn.Parameter], param_index: Tensor, num_groups: int, device: torch.device) -> None:
        self.params, self.param_index, self.num_groups = list(params), param_index, num_groups
        self.first_step = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.first_groups = torch.zeros(num_groups, dtype=torch.bool, device=device)
        self.bad_steps = torch.zeros((), dtype=torch.float64, device=device)
        self._stand_in = torch.zeros(1, device=device)
        self._clean = torch.zeros((), dtype=torch.bool, device=device)

    def check(self, step: int, grad_norms: Tensor | None = None) -> Tensor:
        """Flag this step's gradients; returns a device bool scalar (True if any gradient is NaN/Inf).
        `grad_norms`: this step's per-parameter gradient L2 norms, when a logged step has computed them already."""
        if not self.params:
            return torch.zeros((), dtype=torch.bool, device=self.first_step.device)
        if grad_norms is None:
            grads = gradients(self.params, self._stand_in)
            # ord=2, not inf: the same answer for NaN/Inf, and 16x faster on CPU (max-abs is not vectorised there)
            grad_norms = norms(grads, 2.0)  # accumulated in float32: an fp16 norm above 65504 is no NaN
        if grad_norms.device.type == "cpu" and math.isfinite(grad_norms.sum().item()):
            return self._clean  # on the CPU reading a value costs no sync: skip the bookkeeping on a clean step
        bad_param = ~torch.isfinite(grad_norms)
        bad = bad_param.any()
        group_bad = torch.zeros(self.num_groups, device=bad.device).index_add_(0, self.param_index, bad_param.float()) > 0
        first = bad & (self.first_step < 0)
        self.first_groups = torch.where(first, group_bad, self.first_groups)
        self.first_step = torch.where(first, torch.full_like(self.first_step, float(step)), self.first_step)
        self.bad_steps += bad
        return bad

    def pack(self, packer: object) -> None:
        """Add the device state to a logged step's Packer (read on the sink thread, no sync here)."""
        packer.metric("train/nonfinite_steps", self.bad_steps)  # type: ignore[attr-defined]
        packer.array("nonfinite_first_step", self.first_step.reshape(1))  # type: ignore[attr-defined]
        packer.array("nonfinite_first_groups", self.first_groups)  # type: ignore[attr-defined]

    def skip_step(self) -> None:
        """Drop every gradient so that the optimizer leaves the weights (and its state) as they are."""
        for p in self.params:
            p.grad = None
