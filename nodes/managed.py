"""Hand torch modules to ComfyUI's memory manager so they and FLUX can evict each other."""

from __future__ import annotations

import logging

import torch

import comfy.model_management as mm
import comfy.model_patcher

logger = logging.getLogger(__name__)


class DeviceTracked(torch.nn.Module):
    """Holds a module for ModelPatcher, which records the device in `.device`.

    Hugging Face models expose `device` as a read-only property, so they cannot be patched directly.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, on_move=None):
        super().__init__()
        self.module = module
        self.device = device
        self.on_move = on_move
        self.warned_off_device = False

    def _apply(self, fn, recurse=True):
        # Every .to()/.cuda()/.cpu() passes here: state tied to the old placement (e.g. a captured
        # CUDA graph and its cache) is dropped before the weights move.
        if self.on_move is not None:
            self.on_move()
        return super()._apply(fn, recurse)


class WholeModulePatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher that ComfyUI unloads whole or not at all.

    To free part of a model, ComfyUI moves single layers off the GPU, past DeviceTracked's hook: the
    VLM's cache and CUDA graph would stay there while ComfyUI counts that memory as free. Freeing
    nothing partially makes ComfyUI unload the whole module through .to(), which runs the hook. These
    modules only run wholly loaded anyway.
    """

    def partially_unload(self, *args, **kwargs) -> int:
        return 0


class PinnedModulePatcher(WholeModulePatcher):
    """For weights that cannot move (bitsandbytes-quantised): always wholly on the load device.

    Before a load ComfyUI frees model_size() - loaded_size() more memory; counting these weights as
    not loaded (before the first load, and after an unload, which cannot move them) evicted FLUX for
    memory they already hold. An unload still frees the decoder's cache and CUDA graph (on_move).
    """

    def loaded_size(self) -> int:
        return self.model_size()


def manage(module: torch.nn.Module, on_move=None, movable: bool = True) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher for `module`, which is moved to the offload device until it is needed.

    `on_move` is called before the module moves. A module that is not `movable` (bitsandbytes-quantised
    weights) stays where it was loaded: its patcher's offload device is its load device.
    """
    if not movable:
        device = next(module.parameters()).device
        return PinnedModulePatcher(DeviceTracked(module.eval().requires_grad_(False), device, on_move),
                                   load_device=device, offload_device=device)
    offload = mm.unet_offload_device()
    module = module.to(offload).eval().requires_grad_(False)
    return WholeModulePatcher(DeviceTracked(module, offload, on_move), load_device=mm.get_torch_device(),
                              offload_device=offload)


def intermediate() -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype node outputs (conditioning) live, as ComfyUI's own encoders put them.

    `intermediate_dtype` appeared in ComfyUI in March 2026; earlier releases keep float32.
    """
    dtype = getattr(mm, "intermediate_dtype", None)
    return mm.intermediate_device(), dtype() if dtype is not None else torch.float32


def load(*patchers: comfy.model_patcher.ModelPatcher, memory_required: int = 0) -> None:
    """Put the modules on the compute device, evicting others if needed, with `memory_required` bytes left
    for the run (ComfyUI keeps at least its minimum inference memory free in any case).

    Full loads only: partial (lowvram) loading works only for comfy.ops layers, and plain torch
    layers left behind would sit on the wrong device. ComfyUI's --novram still loads nothing onto
    the GPU; the modules then run where they are, which is said once per module.
    """
    mm.load_models_gpu(list(patchers), memory_required=memory_required, force_full_load=True)
    for patcher in patchers:
        tracked = patcher.model
        device = next(tracked.module.parameters()).device
        if not same_device(device, patcher.load_device) and not tracked.warned_off_device:
            logger.warning("ThinkDiff: ComfyUI left %s on %s instead of %s (e.g. --novram), so it runs there, "
                           "much more slowly", type(tracked.module).__name__, device, patcher.load_device)
            tracked.warned_off_device = True


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)  # cuda == cuda:0
