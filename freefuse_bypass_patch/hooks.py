"""The multi-adapter bypass hook: one per module, every adapter added into its output slice.

Stock ComfyUI keeps one adapter per module and replaces ``module.forward``; two adapters on
one fused ``qkv`` (or two LoRAs on one layer) overwrite each other, and two hooks on one
module break when ejected out of order. Here a module gets one torch forward hook that
owns all of its adapters, in load order, and this module keeps its lifecycle and dispatch:

* every adapter with a factored form (:mod:`.forms`: LoRA, LoHa, LoKr, GLoRA, DoRA, OFT,
  BOFT on a Linear) is built once per (device, dtype) on the first forward, from its
  factors only. Forms that are low-rank products (LoRA, LoHa, GLoRA) are *grouped*: all
  down-projections in one ``mm`` (strength and scale folded in), up-projections written
  into the output in place (one block-diagonal ``addmm_`` on CUDA, one per slice view on
  CPU). Forms that read the output (DoRA, OFT, BOFT) rescale or rotate it in load order,
  as the merged path patches the weight in load order.
* an adapter with no factored form (conv beyond LoCon, diff functions, DoRA on the input
  axis, unknown types) gets its delta from ComfyUI's own ``comfy.lora.calculate_weight``
  inside the forward, in fp32, applied and dropped at once: a transient, never a cache.
  If such an adapter shares a module with a weight-dependent one, the whole module goes
  this way, in load order.
* trainable adapters (``nn.Module``, from ComfyUI's trainer) keep their own ``h``/``g``.

What a hook keeps after a forward: the factors in the compute dtype and O(out) vectors
(:meth:`FusedBypassHook.held_bytes`), dropped when it is detached. Per-LoRA token masks
(:mod:`.masks`) scale each LoRA's term per token: in rank space for grouped forms; LoRAs
switched off (:mod:`.switch`) are skipped. The manager hands each hook the source of that
state (:mod:`.regional`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .forms import DORA_INDEX, conv_form_class, effective_columns, form_class
from .keys import BypassKeyError, Target
from .weights import logical_shape, read, read_bias, unreadable

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
    lora: int = 0  # chain position of the LoRA it came from (for masks)


def is_trainable(adapter: Any) -> bool:
    return isinstance(adapter, torch.nn.Module)


def weight_dependent(adapter: Any) -> bool:
    """True when the adapter's delta depends on the weight it patches (DoRA, OFT, BOFT, GLoRA...).

    Such deltas do not commute with the other patches of the same weight, so they are
    computed in load order against the patched weight. Unknown types count as dependent.
    """
    name = getattr(adapter, "name", None)
    if name not in ("lora", "loha", "lokr"):
        return True
    index = DORA_INDEX[name]
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


class UnreadableWeight(BypassKeyError):
    """The adapter needs the weight (or bias) it patches, and this module's cannot be read."""


def check_slot(slot: AdapterSlot, weight_shape: Sequence[int], module: Optional[torch.nn.Module] = None) -> None:
    """Raise BypassKeyError, naming key, target and shapes, if the slot cannot fit its weight;
    with the ``module``, UnreadableWeight if it needs a weight or bias that cannot be read."""
    _check_shapes(slot, weight_shape)
    if module is not None:
        for part, needed in zip(("weight", "bias"), reads(slot, module)):
            reason = unreadable(module, part) if needed else None
            if reason is not None:
                raise UnreadableWeight("%s key %r needs the %s it patches to be read, but %s"
                                       % (type(slot.adapter).__name__, slot.key, part, reason))


def slot_form_class(slot: AdapterSlot, module: torch.nn.Module) -> Optional[type]:
    """The factored form this slot takes on ``module``, or None (a transient merge-code delta)."""
    target = slot.target
    if target.function is not None or (target.offset is not None and target.offset[0] != 0):
        return None
    shape = logical_shape(module.weight)
    rows = _out_rows(target, shape)[1]
    if len(shape) != 2:
        return conv_form_class(slot.adapter, module, rows)
    return form_class(slot.adapter, rows, int(math.prod(shape[1:])))


def reads(slot: AdapterSlot, module: torch.nn.Module) -> Tuple[bool, bool]:
    """(needs W', needs b): what applying ``slot`` on ``module`` reads besides its own factors."""
    if is_trainable(slot.adapter):
        return False, False
    cls = slot_form_class(slot, module)
    if cls is None:
        return weight_dependent(slot.adapter), False
    has_bias = getattr(module, "bias", None) is not None
    return bool(getattr(cls, "needs_weight", False)), has_bias and bool(getattr(cls, "reads_output", False))


def _check_shapes(slot: AdapterSlot, weight_shape: Sequence[int]) -> None:
    start, length = _out_rows(slot.target, weight_shape)
    in_features = int(math.prod(weight_shape[1:]))
    factors = lora_factors(slot.adapter)
    if factors is not None:
        up, down, _ = factors
        if up.shape[1] != down.shape[0] or up.shape[0] != length or down.shape[1] != in_features:
            raise BypassKeyError(
                "LoRA key %r: up %s x down %s does not fit %s (needs (%d, r) x (r, %d); weight %s)"
                % (slot.key, tuple(up.shape), tuple(down.shape), slot.target.describe(),
                   length, in_features, tuple(weight_shape))
            )
    elif slot.target.function is None and len(weight_shape) == 2 and not is_trainable(slot.adapter) \
            and (slot.target.offset is None or slot.target.offset[0] == 0):
        _probe_form(slot, start, length, in_features, weight_shape)


def _probe_form(slot: AdapterSlot, start: int, length: int, in_features: int, weight_shape) -> None:
    """Build the slot's form on one zero token: a factor that does not fit fails here, at load,
    with the key and the shapes, instead of inside a forward."""
    cls = form_class(slot.adapter, length, in_features)
    if cls is None:
        return
    try:
        form = cls(slot.adapter, slot.strength, start, length, in_features, torch.device("cpu"))
        if form.needs_weight:  # one zero column of the weight: shapes checked, no full-size work
            form.prepare(lambda: iter([(0, 1, torch.zeros(1, length))]))
        term = form.contribution(torch.zeros(1, in_features), torch.zeros(1, length))
        if tuple(term.shape) != (1, length):
            raise ValueError("its term has shape %s" % (tuple(term.shape[1:]),))
    except Exception as err:
        shapes = ", ".join(str(tuple(t.shape)) for t in getattr(slot.adapter, "weights", ()) if isinstance(t, torch.Tensor))
        raise BypassKeyError("%s key %r: factors %s do not fit %s (weight %s): %s"
                             % (type(slot.adapter).__name__, slot.key, shapes, slot.target.describe(),
                                tuple(weight_shape), err)) from None


class _Grouped:
    """Low-rank forms of one module, for one (device, dtype): one ``mm`` for all downs.

    ``down_t`` (in, R) holds every form's down-projection, strength and scale folded in,
    forms that share an output slice adjacent. The up-projections are kept either per
    distinct slice (``plan``: one ``addmm_`` each, on a view of the output) or, with
    ``block_diagonal``, as one (R, out) matrix that is zero outside each form's slice, so
    a single ``addmm_`` covers the whole output. The first does the fewest FLOPs (best on
    CPU); the second launches the fewest kernels (best on GPU). Both are exact: the zero
    blocks add exact zeros. ``columns`` gives each LoRA's rank columns, for masks.
    """

    __slots__ = ("down_t", "plan", "up_full_t", "columns")

    def __init__(self, entries: Sequence[Tuple[int, int, torch.Tensor, torch.Tensor, int]], out_features: int,
                 dtype, block_diagonal: bool):
        rows = {(start, length) for start, length, _, _, _ in entries}
        downs, columns, rank_end = [], [], 0
        if block_diagonal or rows == {(0, out_features)}:
            # any column order works here: each LoRA's columns adjacent, one mask multiply per LoRA
            ordered = sorted(entries, key=lambda entry: entry[4])
            full = torch.zeros(sum(e[3].shape[0] for e in entries), out_features, device=entries[0][3].device)
            for start, length, up, down, lora in ordered:
                full[rank_end:rank_end + down.shape[0], start:start + length] = up.t()
                downs.append(down)
                columns.append((rank_end, rank_end + down.shape[0], lora))
                rank_end += down.shape[0]
            self.up_full_t, self.plan = full.to(dtype), ()
        else:
            by_rows: Dict[Tuple[int, int], list] = {}
            for start, length, up, down, lora in entries:
                by_rows.setdefault((start, length), []).append((up, down, lora))
            plan = []
            for (start, length), members in by_rows.items():
                rank_start = rank_end
                for up, down, lora in members:
                    downs.append(down)
                    columns.append((rank_end, rank_end + down.shape[0], lora))
                    rank_end += down.shape[0]
                up_t = torch.cat([up for up, _, _ in members], dim=1).t()
                plan.append((start, length, rank_start, rank_end, up_t.contiguous().to(dtype)))
            self.up_full_t, self.plan = None, tuple(plan)
        merged: List[Tuple[int, int, int]] = []
        for r0, r1, lora in columns:  # adjacent ranges of one LoRA become one
            if merged and merged[-1][2] == lora and merged[-1][1] == r0:
                merged[-1] = (merged[-1][0], r1, lora)
            else:
                merged.append((r0, r1, lora))
        self.columns = tuple(merged)
        self.down_t = torch.cat(downs, dim=0).t().contiguous().to(dtype)

    def add_(self, x2: torch.Tensor, out2: torch.Tensor, masks: Optional["LoraMasks"] = None,
             off: FrozenSet[int] = frozenset()) -> None:
        """out2 += every form's term; with masks, each LoRA's rank columns scaled per token first.

        LoRAs in ``off`` add nothing: only the other LoRAs' rank columns reach the output.
        """
        on = self.columns
        if off:
            on = tuple(c for c in self.columns if c[2] not in off)
            if not on:
                return
        z = torch.mm(x2, self.down_t)
        if masks is not None:
            for r0, r1, lora in on:
                m = masks(lora)
                if m is not None:
                    z[:, r0:r1].mul_(m)
        if len(on) != len(self.columns):
            return self._add_some(z, out2, on)
        if self.up_full_t is not None:
            out2.addmm_(z, self.up_full_t)
            return
        for start, length, r0, r1, up_t in self.plan:
            out2[:, start:start + length].addmm_(z[:, r0:r1], up_t)

    def _add_some(self, z: torch.Tensor, out2: torch.Tensor, on: Sequence[Tuple[int, int, int]]) -> None:
        """The up-projections of the rank columns ``on`` only (some LoRAs switched off)."""
        ranges: List[List[int]] = []
        for r0, r1, _ in on:  # adjacent ranges become one
            if ranges and ranges[-1][1] == r0:
                ranges[-1][1] = r1
            else:
                ranges.append([r0, r1])
        if self.up_full_t is not None:
            for r0, r1 in ranges:
                out2.addmm_(z[:, r0:r1], self.up_full_t[r0:r1])
            return
        for start, length, p0, p1, up_t in self.plan:
            rows = out2[:, start:start + length]
            for r0, r1 in ranges:
                a, b = max(r0, p0), min(r1, p1)
                if a < b:
                    rows.addmm_(z[:, a:b], up_t[a - p0:b - p0])

    def tensors(self) -> List[torch.Tensor]:
        return [self.down_t] + ([self.up_full_t] if self.up_full_t is not None else [p[4] for p in self.plan])


# A function of a LoRA's chain position: its per-token scale (tokens, 1) for this forward, or None.
LoraMasks = Callable[[int], Optional[torch.Tensor]]


class _Built:
    """A hook's forms for one (device, dtype): segments in load order, and the bias they need."""

    __slots__ = ("segments", "bias")

    def __init__(self, segments, bias):
        # ("add", _Grouped or None, ((form, lora), ...)), ("seq", form, lora) or ("conv", form, lora)
        self.segments = segments
        self.bias = bias

    def tensors(self) -> List[torch.Tensor]:
        out = [self.bias] if self.bias is not None else []
        for segment in self.segments:
            if segment[0] == "add":
                out += segment[1].tensors() if segment[1] is not None else []
                out += [t for form, _ in segment[2] for t in form.tensors()]
            else:  # "seq" and "conv": one form
                out += segment[1].tensors()
        return out


class FusedBypassHook:
    """All bypass adapters of one module, applied by one forward hook."""

    # How grouped up-projections are applied: "auto" (block-diagonal on CUDA, per slice
    # elsewhere), "block" or "sliced". Exposed for the benchmark and the tests.
    layout = "auto"
    # Given to each hook by its manager (see .regional): (hook, input) -> None (nothing to do: the
    # fast path) or (the LoRA masks of this module in this forward or None, chain positions off).
    mask_source: Optional[Callable[["FusedBypassHook", torch.Tensor],
                                   Optional[Tuple[Optional[LoraMasks], FrozenSet[int]]]]] = None

    def __init__(self, module: torch.nn.Module, module_path: str, slots: Sequence[AdapterSlot]):
        self.module = module
        self.module_path = module_path
        self.slots = tuple(slots)
        self.shape = logical_shape(module.weight)  # GGUF: the logical shape, not the blocks'
        self.linear = len(self.shape) == 2
        self.out_features = self.shape[0]
        self.in_features = int(math.prod(self.shape[1:]))
        self.trainable = tuple(s for s in self.slots if is_trainable(s.adapter))
        ordered = [s for s in self.slots if s not in self.trainable]
        classes = [slot_form_class(s, module) for s in ordered]
        if any(c is None for c in classes) and any(weight_dependent(s.adapter) for s in ordered):
            # no factored form for one of them, and order matters: the whole module in load order
            self.form_slots, self.transient_groups = (), (tuple(ordered),)
        else:
            self.form_slots = tuple((s, c) for s, c in zip(ordered, classes) if c is not None)
            self.transient_groups = tuple((s,) for s, c in zip(ordered, classes) if c is None)
        self._built: Dict[Tuple[Any, Any], _Built] = {}
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
        """Remove the hook and drop the built forms: an unloaded model keeps no device memory."""
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        self._built.clear()
        if self.module.__dict__.get(ACTIVE_HOOK_ATTR) is self:
            del self.module.__dict__[ACTIVE_HOOK_ATTR]

    def held_bytes(self) -> int:
        """Bytes of every tensor this hook keeps between forwards (factors and vectors)."""
        seen = {}
        for built in self._built.values():
            for t in built.tensors():
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    # -- forward ---------------------------------------------------------------------
    def _forward_hook(self, module, args, output):
        if not args or not isinstance(output, torch.Tensor):
            return None
        source = self.mask_source
        state = source(self, args[0]) if source is not None else None
        if state is None:
            return self.apply(args[0], output)
        return self.apply(args[0], output, *state)

    def apply(self, x: torch.Tensor, out: torch.Tensor, masks: Optional[LoraMasks] = None,
              off: FrozenSet[int] = frozenset()) -> torch.Tensor:
        """Add every adapter's term to ``out`` (in place where possible) and return it.

        ``masks`` scales each LoRA's term per token; the LoRAs in ``off`` (chain positions)
        add nothing: with all of them off, ``out`` is returned untouched.
        """
        if off and all(slot.lora in off for slot in self.slots):
            return out
        if not out.is_contiguous():
            out = out.contiguous()
        if self.form_slots:
            built = self._built.get((out.device, out.dtype))
            if built is None:
                built = self._built[(out.device, out.dtype)] = self._build(out.device, out.dtype, out.is_cuda)
            self._add_forms(built, x, out, masks, off)
        for group in self.transient_groups:
            if off:  # the rest in load order, as if the LoRAs that are off were never loaded
                group = tuple(slot for slot in group if slot.lora not in off)
            if group:
                self._add_transient(group, x, out, masks)
        for slot in self.trainable:
            if slot.lora not in off:
                out = self._apply_trainable(slot, x, out)
        return out

    def _build(self, device, dtype, cuda: bool) -> _Built:
        """Forms in fp32 on the compute device, weight-reading ones prepared in load order, then cast."""
        if not self.linear:  # conv forms: additive, each applied on its own
            return _Built(tuple(("conv", cls(slot.adapter, slot.strength, *_out_rows(slot.target, self.shape),
                                             self.module, device).cast(device, dtype), slot.lora)
                                for slot, cls in self.form_slots), None)
        forms32, weight = [], None
        for slot, cls in self.form_slots:
            start, length = _out_rows(slot.target, self.shape)
            form = cls(slot.adapter, slot.strength, start, length, self.in_features, device)
            if form.needs_weight:
                if weight is None:  # W' as this module's forward computes with it, read once per build
                    weight = read(self.module, device)[0].reshape(self.out_features, -1)
                form.prepare(effective_columns(_columns32(weight), self.in_features, forms32, (start, length)))
            forms32.append(form)
        del weight
        block = self.layout == "block" or (self.layout == "auto" and cuda)
        segments, run = [], []

        def flush():
            if not run:
                return
            factors = [(f, lora, f.low_rank()) for f, lora in run]  # low_rank() may build (GLoRA: a cat)
            low = [(f.start, f.length) + pair + (lora,) for f, lora, pair in factors if pair is not None]
            grouped = _Grouped(low, self.out_features, dtype, block) if low else None
            rest = tuple((f.cast(device, dtype), lora) for f, lora, pair in factors if pair is None)
            segments.append(("add", grouped, rest))
            run.clear()

        for (slot, _), form in zip(self.form_slots, forms32):
            if form.reads_output:
                flush()
                segments.append(("seq", form.cast(device, dtype), slot.lora))
            else:
                run.append((form, slot.lora))
        flush()
        bias = None
        if any(s[0] == "seq" for s in segments) and getattr(self.module, "bias", None) is not None:
            bias = read_bias(self.module, device, dtype)
        return _Built(tuple(segments), bias)

    def _add_forms(self, built: _Built, x: torch.Tensor, out: torch.Tensor, masks: Optional[LoraMasks],
                   off: FrozenSet[int] = frozenset()) -> None:
        if not self.linear:
            xc = x if x.dtype == out.dtype else x.to(out.dtype)
            for _, form, lora in built.segments:
                if lora not in off:
                    out.narrow(1, form.start, form.length).add_(form.contribution(xc))
            return
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != out.dtype:
            x2 = x2.to(out.dtype)
        out2 = out.view(-1, out.shape[-1])
        if masks is not None and any(s[0] == "seq" for s in built.segments):
            return self._add_forms_tracked(built, x2, out2, masks, off)
        for segment in built.segments:
            if segment[0] == "add":
                if segment[1] is not None:
                    segment[1].add_(x2, out2, masks, off)
                for form, lora in segment[2]:
                    if lora in off:
                        continue
                    rows, mask = out2.narrow(1, form.start, form.length), masks(lora) if masks is not None else None
                    if hasattr(form, "add_into"):
                        form.add_into(x2, rows, mask)
                    else:
                        _add_masked(rows, form.contribution(x2, None), mask)
            elif segment[2] not in off:
                form = segment[1]
                bias = built.bias.narrow(0, form.start, form.length) if built.bias is not None else None
                rows = out2.narrow(1, form.start, form.length)
                if hasattr(form, "update_"):
                    form.update_(x2, rows, bias)
                else:
                    y = rows - bias if bias is not None else rows.clone()
                    rows.add_(form.contribution(x2, y))

    def _add_forms_tracked(self, built: _Built, x2, out2, masks: LoraMasks, off: FrozenSet[int] = frozenset()) -> None:
        """Masks with forms that read the output: those read y = W'x unmasked, tracked beside out."""
        y = out2 - built.bias if built.bias is not None else out2.clone()
        for segment in built.segments:
            if segment[0] == "add":
                if segment[1] is not None:
                    segment[1].add_(x2, y, None, off)
                    segment[1].add_(x2, out2, masks, off)
                pairs = segment[2]
            else:
                pairs = ((segment[1], segment[2]),)
            for form, lora in pairs:
                if lora in off:
                    continue
                rows = y.narrow(1, form.start, form.length)
                d = form.contribution(x2, rows)
                rows.add_(d)
                _add_masked(out2.narrow(1, form.start, form.length), d, masks(lora))

    def _add_transient(self, group: Tuple[AdapterSlot, ...], x: torch.Tensor, out: torch.Tensor,
                       masks: Optional[LoraMasks]) -> None:
        """Deltas from ComfyUI's merge code, in fp32, formed inside this forward and dropped.

        Adapters whose delta does not depend on the weight are computed against zeros (the
        weight is never read); otherwise against the dequantized weight, in load order.
        """
        import comfy.lora  # the real merge code is the reference for these adapter types

        if any(weight_dependent(s.adapter) for s in group):
            current = read(self.module, out.device, torch.float32)[0]
        else:
            current = torch.zeros(self.shape, device=out.device, dtype=torch.float32)
        steps = [group] if masks is None else [(s,) for s in group]
        xc = x if x.dtype == out.dtype else x.to(out.dtype)
        for step in steps:
            patches = [(s.strength, s.adapter, 1.0, s.target.offset, s.target.function) for s in step]
            patched = comfy.lora.calculate_weight(patches, current.clone(), step[0].target.weight_key,
                                                  intermediate_dtype=torch.float32)
            delta, current = (patched.to(torch.float32) - current).to(out.dtype), patched
            if delta.dim() != 2:
                term = _conv(self.module, xc, delta)
            else:
                term = F.linear(xc, delta)
            m = masks(step[0].lora) if masks is not None and len(step) == 1 else None
            if m is not None and term.dim() == out.dim() and delta.dim() == 2:
                term = term.reshape(-1, term.shape[-1]).mul_(m).view(out.shape)
            out.add_(term)
            del delta, term

    def _apply_trainable(self, slot: AdapterSlot, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """ComfyUI's own bypass contract for trainable adapters: g(f(x) + h(x))."""
        adapter = slot.adapter
        _set_module_info(adapter, self.module, slot.strength)
        h = adapter.h(x, out)
        if slot.target.offset is not None and slot.target.offset[0] == 0:
            out.narrow(-1, slot.target.offset[1], slot.target.offset[2]).add_(h)
            return out
        return adapter.g(out + h)


def _add_masked(rows: torch.Tensor, term: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    if mask is None:
        rows.add_(term)
    else:
        rows.addcmul_(term, mask)


def _columns32(weight: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """W'[:, c0:c1] in fp32: one chunk of columns at a time (W' may be the module's own fp16 weight)."""
    return lambda c0, c1: weight[:, c0:c1].to(torch.float32)


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
