"""torch.distributed._tools trackers, patched only where they break on LoRA models.

MemTracker._track_module_params_and_buffers (torch 2.13 mem_tracker.py) calls `register_hook` on
every parameter of a module it enters, which raises "cannot register a hook on a tensor that doesn't
require gradient" for frozen weights (the LoRA base). This subclass installs the gradient hooks only
on parameters that require a gradient; everything else (categories, peaks) is the upstream code.

Both trackers here also skip the per-module peak bookkeeping: upstream `_update_peak_stats` walks every
module seen so far on every dispatched op (O(ops x modules), minutes for a LoRA model with thousands
of small modules); only the global per-device peak, which is all `shardtrain plan --trace` reads, is
kept, with the upstream code for it.
"""
from __future__ import annotations

from copy import deepcopy

from torch import nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _MemRefType, MemTracker

_TOTAL_KEY = "Total"


class _GlobalPeakOnly:
    def _update_peak_stats(self, peak_state) -> None:
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = deepcopy(dev_snap)


class GlobalPeakFSDPMemTracker(_GlobalPeakOnly, FSDPMemTracker):
    """FSDPMemTracker keeping only the global peak (see module docstring)."""


class FrozenSafeMemTracker(_GlobalPeakOnly, MemTracker):
    """MemTracker that tolerates frozen parameters (LoRA / QLoRA base weights)."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        mem = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if not install_grad_hooks:
            return mem

        def _grad_hook(grad):
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        for param in module.parameters():
            if param.requires_grad and self._param_to_grad_hook_handles.get(param, None) is None:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(_grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: _grad_hook(p.grad)))
        return mem
