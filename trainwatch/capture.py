"""What is measured at a logged step, given a bound model: gradients, weights and updates, activations.

Framework-free glue between the probes and a Packer: the Lightning callback decides *when*, this decides
*what*. Everything stays on the device; nothing here synchronises with the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainwatch.groups import Binding
from trainwatch.probes import gradients as G
from trainwatch.probes import weight_copy
from trainwatch.probes._scope import untouched
from trainwatch.probes.activations import STAT_COLUMNS, ActivationProbe, pool_summaries, saturation_kind
from trainwatch.probes.model_inputs import ModelInputs
from trainwatch.probes.weight_copy import WeightCopy, measure
from trainwatch.record import Packer

log = logging.getLogger(__name__)
_TMPDIR_FIX = "Point TMPDIR at a writable disk with room for a copy of the model's weights to avoid it."


def _unwritable(error: OSError) -> str:
    return f"a copy of the weights could not be kept in a temporary file ({type(error).__name__}: {error})"


class Capture:
    """Per-run tensors (group indices, init snapshot) and the measurements of one logged step."""

    def __init__(self, binding: Binding, device: torch.device, distance_from_init: bool) -> None:
        self.b = binding
        self.device = device
        self.param_index = torch.tensor(binding.param_index, device=device, dtype=torch.long)
        self.numel = G.numels(binding.params) if binding.params else None
        self.act_index = torch.tensor(binding.act_index, device=device, dtype=torch.long)
        self.activations = ActivationProbe(list(zip(binding.act_names, binding.act_modules, strict=True)))
        # act_saturated_frac is only meaningful (and only logged) for groups holding a tanh or sigmoid.
        saturating = sorted({g for g, m in zip(binding.act_index, binding.act_modules, strict=True) if saturation_kind(m)})
        self._sat_groups = torch.tensor(saturating, device=device, dtype=torch.long)
        self._sat_keys = [binding.act_keys[g] for g in saturating]
        self._init: WeightCopy | None = None
        if distance_from_init and binding.params:
            try:
                self._init = WeightCopy(binding.params)
            except OSError as error:  # a full or read-only temporary directory must not stop training
                log.warning("trainwatch: %s; weight_dist_init is not logged. %s", _unwritable(error), _TMPDIR_FIX)
        # The weights before a logged optimizer step, for the update ‖Δw‖. On CUDA (and other accelerators) a
        # transient copy on the device (the caching allocator hands it memory the forward's activations left); on
        # the CPU a `WeightCopy` in the page cache, retaken at each logged step: a copy in process memory would
        # raise the peak by the model's size wherever weights outweigh activations, and a fresh one page-faults (no
        # faster than the file). Weights of a few MB are copied in memory (the file's system calls and mappings
        # would cost more than the copy). If the file cannot be written, copies in memory from then on.
        self._before: list[Tensor] | None = None
        self._pre_step: WeightCopy | None = None
        self._pre_step_in_file = device.type == "cpu" and not weight_copy.fits_in_memory(binding.params)
        self._weight_norms: Tensor | None = None
        self._grad: G.TensorStats | None = None

    @property
    def n_param_groups(self) -> int:
        return len(self.b.param_keys)

    def gradients(self, packer: Packer) -> Tensor | None:
        """Gradient statistics now (accumulated, unscaled, reduced, not yet clipped), and the weights before the
        optimizer step, for the update ratio. Returns the per-parameter gradient L2 norms, for the non-finite check."""
        if not self.b.params:
            return None
        stats = G.grad_stats(self.b.params, self.numel)
        self._grad = stats
        grouped = G.group_grad_stats(stats, self.param_index, self.n_param_groups)
        keys = self.b.param_keys
        packer.metrics("grad_norm", keys, grouped.norm)
        packer.metrics("grad_max", keys, grouped.max_abs)
        packer.metrics("grad_nonfinite", keys, grouped.nonfinite)
        packer.metrics("grad_zero_frac", keys, grouped.zero_frac)
        packer.metric("train/grad_norm_total", G.total_norm(stats))
        packer.metric("train/grad_nonfinite_total", stats.nonfinite.sum())
        self._take_pre_step()
        # the weights' norms before the step: beside a copy in a file they come later, with the update, from the copy
        self._weight_norms = G.norms([p.detach() for p in self.b.params], 2.0) if self._before is not None else None
        return stats.sq_norm.sqrt()

    def _take_pre_step(self) -> None:
        if self._pre_step_in_file:
            try:
                if self._pre_step is None:
                    self._pre_step = WeightCopy(self.b.params)
                else:
                    self._pre_step.take(self.b.params)
                return
            except OSError as error:
                log.warning(
                    "trainwatch: %s; the weights before each logged optimizer step are copied in memory from now on (one "
                    "more copy of the model during those steps). %s", _unwritable(error), _TMPDIR_FIX,
                )  # fmt: skip
                if self._pre_step is not None:
                    self._pre_step.close()
                self._pre_step, self._pre_step_in_file = None, False
        self._before = G.snapshot(self.b.params)

    def updates(self, packer: Packer) -> None:
        """After the optimizer step: weight norms, ‖Δw‖/‖w‖ of the step actually taken, distance from init."""
        if self._grad is None:
            return
        from_init = None
        if self._before is not None:
            assert self._weight_norms is not None
            update, weight_norms, self._before = G.update_norms(self.b.params, self._before), self._weight_norms, None
        else:  # one pass over the weights for the update and the distance from initialisation
            assert self._pre_step is not None
            measured = measure(self.b.params, [self._pre_step] + ([self._init] if self._init else []), copy_norms=True)
            assert measured.copy_norms is not None
            update, weight_norms, from_init = measured.distances[0], measured.copy_norms, measured.distances[1:]
        n, keys = self.n_param_groups, self.b.param_keys
        weight = G.pooled_norm(weight_norms, self.param_index, n)
        packer.metrics("weight_norm", keys, weight)
        packer.metrics("update_ratio", keys, G.pooled_norm(update, self.param_index, n) / weight.clamp_min(1e-12))
        if self._init is not None:
            distance = from_init[0] if from_init else self._init.distances(self.b.params)
            packer.metrics("weight_dist_init", keys, G.pooled_norm(distance, self.param_index, n))
        g = self._grad
        zero_frac = g.zeros / g.numel.clamp_min(1)
        table = torch.stack([g.sq_norm.sqrt(), g.max_abs, g.nonfinite, zero_frac, weight_norms, update, g.numel], dim=1)
        packer.array("param_stats", table)
        self._grad = None

    def close(self) -> None:
        """Remove the activation hooks and drop the weight copies. Idempotent."""
        self.activations.disarm()
        for copy in (self._init, self._pre_step):
            if copy is not None:
                copy.close()
        self._init = self._pre_step = None
        self._before = None

    def probe_activations(
        self, model: nn.Module, inputs: ModelInputs, reduce: Callable[[Tensor], Tensor], packer: Packer | None, part: int | None = None
    ) -> None:
        """Forward the fixed probe batch in eval mode, leaving the model untouched; summaries are summed
        over ranks with `reduce` (a collective every rank must call).

        `part`: samples per forward (the training batch size), so that the probe never holds a layer's activations
        for more samples than a training step does: a probe larger than the batch a GPU was filled with would
        otherwise run out of memory. The parts add up to the summaries of the whole batch, dead units included."""
        with untouched(model):
            # Balanced parts (sizes differ by at most one): no one-sample remainder that a model's squeeze() might trip on.
            for chunk in inputs.parts(-(-inputs.samples // part)) if part else [inputs]:
                self.activations.arm(chunk.samples)
                try:
                    chunk.forward(model, self.device)  # a copy, from pinned memory beside a GPU: no host sync
                finally:
                    self.activations.disarm()
        self.pack_activations(reduce(self.activations.collect(self.device)), packer)

    def pack_activations(self, summaries: Tensor, packer: Packer | None) -> None:
        if packer is None or not self.b.act_names:
            return
        n = len(self.b.act_keys)
        pooled = pool_summaries(summaries, self.act_index, n)
        # a group none of whose modules ran in this forward (a head used only in training) has no value, not 0
        present = G.group_sum(summaries[:, STAT_COLUMNS.index("numel")], self.act_index, n) > 0
        for family, values in pooled.items():
            if family == "act_saturated_frac":
                if self._sat_keys:
                    packer.metrics(family, self._sat_keys, values[self._sat_groups], present[self._sat_groups])
            else:
                packer.metrics(family, self.b.act_keys, values, present)
        packer.array("activations", summaries)
