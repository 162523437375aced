"""The multi-adapter bypass hook: one per module, every adapter added into its output slice.

Stock ComfyUI keeps one adapter per module and replaces ``module.forward``; two adapters on
one fused ``qkv`` (or two LoRAs on one layer) overwrite each other, and two hooks on one
module break when ejected out of order. Here a module gets one torch forward hook that
owns all of its adapters:

* plain LoRA factors on a Linear (the common case) are *grouped*: the down-projections of
  every slot are concatenated along the rank (strength and alpha/rank folded in), so one
  ``mm`` computes them all; the up-projections are then written straight into the output
  in place. Kernels per module and forward: 2 on CUDA (``mm`` + one block-diagonal
  ``addmm_``), ``1 + number of distinct slices`` on CPU (``addmm_`` per slice view), +1
  cast if the activation dtype differs from the output's. Nothing of the output's size
  is allocated, per adapter or otherwise.
* every other adapter (LoHa, LoKr, OFT, BOFT, GLoRA, DoRA, LoCon ``mid``, diff functions)
  goes through ComfyUI's own ``comfy.lora.calculate_weight`` once, against an fp32 copy of
  the module's weight, and the resulting delta is applied as ``out[slice] += x @ delta.T``:
  exactly what the merged path computes, without writing to the weight.
* trainable adapters (``nn.Module``, from ComfyUI's trainer) keep their own ``h``/``g``.

Factors are cast once per (device, dtype) and cached on the hook while it is attached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .keys import BypassKeyError, Target

log = logging.getLogger(__name__)

# Attribute on a hooked module naming the hook that is attached to it right now.
ACTIVE_HOOK_ATTR = "_freefuse_bypass_hook"


@dataclass(frozen=True)
class AdapterSlot:
    """One adapter bound to one target, with the strength it was loaded at."""

    key: Any  # the load_lora key, for messages
    target: Target
    adapter: Any
    strength: float


def is_trainable(adapter: Any) -> bool:
    return isinstance(adapter, torch.nn.Module)


# Where each adapter type keeps its DoRA scale in ``weights`` (ComfyUI's load() order).
_DORA_INDEX = {"lora": 4, "loha": 7, "lokr": 8}


def weight_dependent(adapter: Any) -> bool:
    """True when the adapter's delta depends on the weight it patches (DoRA, OFT, BOFT, GLoRA...).

    Such deltas do not commute with the other patches of the same weight, so they are
    computed in load order against the patched weight. Unknown types count as dependent.
    """
    index = _DORA_INDEX.get(getattr(adapter, "name", None))
    if index is None:
        return True
    weights = getattr(adapter, "weights", ())
    return len(weights) > index and weights[index] is not None


def lora_factors(adapter: Any) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[float]]]:
    """(up, down, alpha) for a plain LoRA; None for anything that is not a plain LoRA."""
    if is_trainable(adapter) or getattr(adapter, "name", None) != "lora":
        return None
    weights = getattr(adapter, "weights", None)
    if not isinstance(weights, (tuple, list)) or len(weights) < 3:
        return None
    up, down, alpha = weights[0], weights[1], weights[2]
    extras = weights[3:6]  # mid (LoCon/Tucker), dora_scale, reshape
    if any(e is not None for e in extras):
        return None
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return None
    if up.dim() != 2 or down.dim() != 2:
        return None
    return up, down, (float(alpha) if alpha is not None else None)


def _out_rows(target: Target, weight_shape: Sequence[int]) -> Tuple[int, int]:
    """(start, length) of the output rows a target writes; raises if the slice is outside."""
    if target.offset is None:
        return 0, int(weight_shape[0])
    dim, start, length = target.offset
    if dim < 0 or dim >= len(weight_shape) or start + length > weight_shape[dim]:
        raise BypassKeyError(
            "%s: slice outside weight of shape %s" % (target.describe(), tuple(weight_shape))
        )
    if dim != 0:
        return 0, int(weight_shape[0])
    return start, length


def check_slot(slot: AdapterSlot, weight_shape: Sequence[int]) -> None:
    """Raise BypassKeyError, naming key, target and shapes, if the slot cannot fit its weight."""
    start, length = _out_rows(slot.target, weight_shape)
    factors = lora_factors(slot.adapter)
    if factors is None:
        return
    up, down, _ = factors
    in_features = 1
    for d in weight_shape[1:]:
        in_features *= int(d)
    if up.shape[1] != down.shape[0] or up.shape[0] != length or down.shape[1] != in_features:
        raise BypassKeyError(
            "LoRA key %r: up %s x down %s does not fit %s (needs (%d, r) x (r, %d); weight %s)"
            % (slot.key, tuple(up.shape), tuple(down.shape), slot.target.describe(),
               length, in_features, tuple(weight_shape))
        )


class _Grouped:
    """Prepared factors of all grouped LoRA slots of a module, for one (device, dtype).

    ``down_t`` (in, R) holds every slot's down-projection, strength and alpha/rank folded
    in, slots that share an output slice adjacent. The up-projections are kept either
    per distinct slice (``plan``: one ``addmm_`` each, on a view of the output) or, with
    ``block_diagonal``, as one (R, out) matrix that is zero outside each slot's slice, so
    a single ``addmm_`` covers the whole output. The first does the fewest FLOPs (best on
    CPU); the second launches the fewest kernels (best on GPU, where the extra FLOPs are
    a rank-sized sliver next to the output's memory traffic). Both are exact: the zero
    blocks add exact zeros.
    """

    __slots__ = ("down_t", "plan", "up_full_t")

    def __init__(self, slots: Sequence[AdapterSlot], out_features: int, device, dtype, block_diagonal: bool):
        by_rows: Dict[Tuple[int, int], List[AdapterSlot]] = {}
        for slot in slots:
            by_rows.setdefault(_out_rows(slot.target, (out_features, 1)), []).append(slot)
        downs, plan, rank_end = [], [], 0
        for (start, length), members in by_rows.items():
            ups, rank_start = [], rank_end
            for slot in members:
                up, down, alpha = lora_factors(slot.adapter)
                rank = down.shape[0]
                scale = slot.strength * (alpha / rank if alpha is not None else 1.0)
                downs.append(down.to(device=device, dtype=torch.float32) * scale)
                ups.append(up.to(device=device, dtype=torch.float32))
                rank_end += rank
            plan.append((start, length, rank_start, rank_end, torch.cat(ups, dim=1).t()))
        self.down_t = torch.cat(downs, dim=0).t().contiguous().to(dtype)
        if block_diagonal or (len(plan) == 1 and plan[0][1] == out_features):
            full = torch.zeros(rank_end, out_features, device=device, dtype=torch.float32)
            for start, length, r0, r1, up_t in plan:
                full[r0:r1, start:start + length] = up_t
            self.up_full_t = full.to(dtype)
            self.plan = ()
        else:
            self.up_full_t = None
            self.plan = tuple((s, n, r0, r1, up_t.contiguous().to(dtype)) for s, n, r0, r1, up_t in plan)


class FusedBypassHook:
    """All bypass adapters of one module, applied by one forward hook."""

    # How grouped up-projections are applied: "auto" (block-diagonal on CUDA, per slice
    # elsewhere), "block" or "sliced". Exposed for the benchmark and the tests.
    layout = "auto"

    def __init__(self, module: torch.nn.Module, module_path: str, slots: Sequence[AdapterSlot]):
        self.module = module
        self.module_path = module_path
        self.slots = tuple(slots)
        weight = getattr(module, "weight", None)
        linear = isinstance(weight, torch.Tensor) and weight.dim() == 2
        self.trainable = tuple(s for s in self.slots if is_trainable(s.adapter))
        merged_like = tuple(s for s in self.slots if s not in self.trainable)
        if any(weight_dependent(s.adapter) for s in merged_like):
            # DoRA/OFT/BOFT/GLoRA read the weight they patch; the merged path patches in
            # order, so every adapter of this module goes into one ordered delta.
            self.grouped = ()
            self.dense_groups = (merged_like,) if merged_like else ()
        else:
            self.grouped = tuple(
                s for s in merged_like
                if linear and s.target.function is None and lora_factors(s.adapter) is not None
                and (s.target.offset is None or s.target.offset[0] == 0)
            )
            self.dense_groups = tuple((s,) for s in merged_like if s not in self.grouped)
        self._grouped_cache: Dict[Tuple[Any, Any], _Grouped] = {}
        self._dense_fp32: Optional[List[Tuple[torch.Tensor, Optional[Tuple[int, int]]]]] = None
        self._dense_cache: Dict[Tuple[Any, Any], list] = {}
        self._handle = None

    # -- lifecycle -------------------------------------------------------------------
    def attach(self) -> None:
        """Register the forward hook; a hook of another patcher on this module is detached first."""
        if self._handle is not None:
            return
        other = self.module.__dict__.get(ACTIVE_HOOK_ATTR)
        if other is not None and other is not self:
            other.detach()
        self._handle = self.module.register_forward_hook(self._forward_hook)
        self.module.__dict__[ACTIVE_HOOK_ATTR] = self

    def detach(self) -> None:
        """Remove the hook and drop the cast factors: an unloaded model keeps no device memory."""
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        self._grouped_cache.clear()
        self._dense_cache.clear()
        self._dense_fp32 = None
        if self.module.__dict__.get(ACTIVE_HOOK_ATTR) is self:
            del self.module.__dict__[ACTIVE_HOOK_ATTR]

    # -- forward ---------------------------------------------------------------------
    def _forward_hook(self, module, args, output):
        if not args or not isinstance(output, torch.Tensor):
            return None
        return self.apply(args[0], output)

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add every adapter's output to ``out`` (in place where possible) and return it."""
        if not out.is_contiguous():
            out = out.contiguous()
        if self.grouped:
            self._add_grouped(x, out)
        if self.dense_groups:
            self._add_dense(x, out)
        for slot in self.trainable:
            out = self._apply_trainable(slot, x, out)
        return out

    def _add_grouped(self, x: torch.Tensor, out: torch.Tensor) -> None:
        key = (out.get_device(), out.dtype)
        prep = self._grouped_cache.get(key)
        if prep is None:
            prep = self._grouped_cache[key] = _Grouped(self.grouped, out.shape[-1], out.device, out.dtype,
                                                       block_diagonal=self._block_diagonal(out))
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != out.dtype:
            x2 = x2.to(out.dtype)
        out2 = out.view(-1, out.shape[-1])
        z = torch.mm(x2, prep.down_t)
        if prep.up_full_t is not None:
            out2.addmm_(z, prep.up_full_t)
            return
        for start, length, r0, r1, up_t in prep.plan:
            out2[:, start:start + length].addmm_(z[:, r0:r1], up_t)

    def _block_diagonal(self, out: torch.Tensor) -> bool:
        return self.layout == "block" or (self.layout == "auto" and out.is_cuda)

    def _dense_deltas(self) -> List[Tuple[torch.Tensor, Optional[Tuple[int, int]]]]:
        """(fp32 delta, output rows or None) per dense group, computed once by ComfyUI's merge code.

        A group's patches are applied in load order to an fp32 copy of the weight, exactly
        as the merged path does; the delta is the result minus the weight. A group of one
        slot on a row slice keeps only those rows.
        """
        if self._dense_fp32 is None:
            import comfy.lora  # the real merge code is the reference for these adapter types

            w32 = float_weight(self.module.weight)
            deltas = []
            for group in self.dense_groups:
                patches = [(s.strength, s.adapter, 1.0, s.target.offset, s.target.function) for s in group]
                merged = comfy.lora.calculate_weight(patches, w32.clone(), group[0].target.weight_key,
                                                     intermediate_dtype=torch.float32)
                delta, rows = merged.to(torch.float32) - w32, None
                offset = group[0].target.offset
                if len(group) == 1 and offset is not None and offset[0] == 0:
                    rows = (offset[1], offset[2])
                    delta = delta.narrow(0, offset[1], offset[2])
                deltas.append((delta.contiguous(), rows))
            self._dense_fp32 = deltas
        return self._dense_fp32

    def _add_dense(self, x: torch.Tensor, out: torch.Tensor) -> None:
        key = (out.get_device(), out.dtype)
        deltas = self._dense_cache.get(key)
        if deltas is None:
            deltas = self._dense_cache[key] = [(d.to(device=out.device, dtype=out.dtype), rows)
                                               for d, rows in self._dense_deltas()]
        xc = x if x.dtype == out.dtype else x.to(out.dtype)
        for delta, rows in deltas:
            if delta.dim() != 2:
                out.add_(_conv(self.module, xc, delta))
            elif rows is not None:
                out.narrow(-1, rows[0], rows[1]).add_(F.linear(xc, delta))
            else:
                out.add_(F.linear(xc, delta))

    def _apply_trainable(self, slot: AdapterSlot, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """ComfyUI's own bypass contract for trainable adapters: g(f(x) + h(x))."""
        adapter = slot.adapter
        _set_module_info(adapter, self.module, slot.strength)
        h = adapter.h(x, out)
        if slot.target.offset is not None and slot.target.offset[0] == 0:
            out.narrow(-1, slot.target.offset[1], slot.target.offset[2]).add_(h)
            return out
        return adapter.g(out + h)


def float_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as fp32 values: fp8 is upcast, quantized tensor types (ComfyUI's
    QuantizedTensor, GGUF's) are dequantized with their own ``dequantize()``."""
    w = weight.detach()
    dequantize = getattr(w, "dequantize", None)
    if type(w) not in (torch.Tensor, torch.nn.Parameter) and callable(dequantize):
        w = dequantize()
    return w.to(torch.float32)


def _conv(module: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[delta.dim()]
    return fn(x, delta, None, module.stride, module.padding, module.dilation, module.groups)


def _set_module_info(adapter: Any, module: torch.nn.Module, strength: float) -> None:
    """The attributes ComfyUI's ``h()`` implementations read (same as the stock hook sets)."""
    conv_dim = {torch.nn.Conv1d: 1, torch.nn.Conv2d: 2, torch.nn.Conv3d: 3}.get(
        next((c for c in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d) if isinstance(module, c)), None), 0)
    adapter.multiplier = strength
    adapter.is_conv = conv_dim > 0
    adapter.conv_dim = conv_dim
    adapter.kernel_size = getattr(module, "kernel_size", (1,))
    adapter.in_channels = getattr(module, "in_channels", None)
    adapter.out_channels = getattr(module, "out_channels", None)
    adapter.kw_dict = (
        {"stride": module.stride, "padding": module.padding, "dilation": module.dilation, "groups": module.groups}
        if conv_dim else {}
    )
