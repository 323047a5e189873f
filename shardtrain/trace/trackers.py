"""torch.distributed._tools trackers, patched only where they break on LoRA models.

MemTracker._track_module_params_and_buffers (torch 2.13 mem_tracker.py) calls `register_hook` on
every parameter of a module it enters, which raises "cannot register a hook on a tensor that doesn't
require gradient" for frozen weights (the LoRA base). This subclass installs the gradient hooks only
on parameters that require a gradient; everything else (categories, peaks) is the upstream code.

Both trackers here also skip the per-module peak bookkeeping: upstream `_update_peak_stats` walks every
module seen so far on every dispatched op (O(ops x modules), minutes for a LoRA model with thousands
of small modules); only the global per-device peak, which is all `shardtrain plan --trace` reads, is
kept, with the upstream code for it.

Host memory: storages allocated inside `host_allocations()` (checkpoint offload's host copies,
trace/savers.py host_resident) are filed under the `HOST` key instead of their (fake) "cpu" device, so
they count in no device peak; their own peak is `host_peak`.
"""
from __future__ import annotations

import contextlib
from copy import deepcopy

from torch import nn
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _MemRefType, _UpdateType, _WeakRefInfo, MemTracker

_TOTAL_KEY = "Total"


class _HostMemory:
    """The snapshot key of host memory (checkpoint offload's copies): not a device, never in a peak.
    `type` is what _WeakRefInfo reads (no CUDA rounding)."""
    type = "host"

    def __repr__(self) -> str:
        return "host"


HOST = _HostMemory()


class _GlobalPeakOnly:
    """Global per-device peak only (module docstring); storages allocated inside `host_allocations()` are
    filed under HOST (their own peak in `host_peak`), as a GPU run keeps them in host memory."""
    _host_alloc = False
    host_peak = 0

    @contextlib.contextmanager
    def host_allocations(self):
        self._host_alloc = True
        try:
            yield
        finally:
            self._host_alloc = False

    def _track(self, reftype, t) -> None:
        if not self._host_alloc:
            return super()._track(reftype, t)
        for st in get_untyped_storages(t):
            if self._WINFO.get(st, (None, None))[0] is None:   # new storage: the host copy (copy_ reuses it)
                winfo, w_st = _WeakRefInfo.create_winfo(st, HOST, reftype, self._delete_callback)
                self._WINFO[st] = (winfo, w_st)
                if winfo.mem_consumed > 0:
                    self._update_snap(_UpdateType.ADD, winfo)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, dev_snap in self._curr_mem_snap.items():
            if dev is HOST:
                self.host_peak = max(self.host_peak, dev_snap[_TOTAL_KEY])
            elif self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
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
