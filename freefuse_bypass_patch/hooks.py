"""The multi-adapter bypass hook: one per module, every adapter added into its output slice.

Stock ComfyUI keeps one adapter per module and replaces ``module.forward``; two adapters on
one fused ``qkv`` (or two LoRAs on one layer) overwrite each other, and two hooks on one
module break when ejected out of order. Here a module gets one torch forward hook that
owns all of its adapters, in load order, as :mod:`.slots` decided them at load:

* factored forms (:mod:`.forms`, :mod:`.conv_forms`) are built once per (device, dtype) on
  the first forward, from the factors only. Low-rank ones (LoRA, GLoRA) are *grouped*: all
  down-projections in one ``mm`` (strength and scale folded in), up-projections written
  into the output in place (block-diagonal, one ``addmm_``, or one per slice: see
  ``_Grouped``). The others add their term in place (``add_``) or, if they read the output
  (DoRA, OFT, BOFT), rewrite it in load order (``update_``), as merged patches the weight
  in load order.
* transient adapters get their delta from ComfyUI's ``comfy.lora.calculate_weight`` inside
  the forward, fp32, dropped at once. One whose delta does not read the weight is computed
  against zeros, alone; the first one that reads it (DoRA on the input axis, a conv DoRA...)
  is computed against W' and the merge code's own patching of the adapters before it, and
  every adapter after it in the module goes the same way, in load order. Adapters before it
  stay factored.
* trainable adapters (``nn.Module``, from ComfyUI's trainer) keep their own ``h``/``g``.
* patches added to the weight after the adapters (a merged LoRA, a model merge) are composed
  at inject by :mod:`.later_patches`: scales on additive terms, or the module replayed in
  load order through the merge code when an adapter that reads W' or the output has some.

What a hook keeps after a forward: the factors in the compute dtype and O(out) vectors
(:meth:`FusedBypassHook.held_bytes`), dropped when it is detached. Its manager hands it the
source of per-forward state (:mod:`.regional`): per-LoRA token masks, which scale each
LoRA's term per token (in rank space for grouped forms), and the LoRAs switched off
(:mod:`.switch`), which add nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Callable, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import later_patches
from .forms import Form, add_masked, effective_columns
from .slots import FACTORED, TRANSIENT, AdapterSlot, out_rows, weight_dependent
from .weights import logical_shape, read, read_bias

log = logging.getLogger(__name__)

# Attribute on a hooked module naming the hook that is attached to it right now.
ACTIVE_HOOK_ATTR = "_freefuse_bypass_hook"
LAYOUTS = ("auto", "block", "sliced")  # grouped up-projections: see _Grouped; auto = block on CUDA

# A function of a LoRA's chain position: its per-token scale (tokens, 1) for this forward, or None.
LoraMasks = Callable[[int], Optional[torch.Tensor]]
# What the manager's source gives a hook for one forward (None: nothing to do, the fast path).
HookState = Tuple[Optional[LoraMasks], FrozenSet[int]]


class _Grouped:
    """Low-rank forms of one module, for one (device, dtype): one ``mm`` for all downs.

    ``down_t`` (in, R) holds every form's down-projection, strength and scale folded in,
    forms that share an output slice adjacent. The up-projections are kept either per
    distinct slice (``plan``: one ``addmm_`` each, on a view of the output) or, with
    ``block_diagonal``, as one (R, out) matrix that is zero outside each form's slice, so
    a single ``addmm_`` covers the whole output. The first does the fewest FLOPs (best on
    CPU); the second launches the fewest kernels (best on GPU) and is used only where its
    zero blocks keep the bytes held within twice the factors' (:func:`_block_fits`: one
    slice, or equal thirds such as q/k/v; Flux's ``linear1``, q/k/v/mlp, stays per slice).
    Both are exact: the zero blocks add exact zeros. ``columns`` gives each LoRA's rank
    columns, for masks.
    """

    __slots__ = ("down_t", "plan", "up_full_t", "columns")

    def __init__(self, entries: Sequence[Tuple[int, int, torch.Tensor, torch.Tensor, int]], out_features: int,
                 dtype, block_diagonal: bool):
        rows = {(start, length) for start, length, _, _, _ in entries}
        downs, columns, rank_end = [], [], 0
        if block_diagonal or rows == {(0, out_features)}:
            block_diagonal = _block_fits(entries, out_features)
        if block_diagonal:
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


def _block_fits(entries, out_features: int) -> bool:
    """Does the block-diagonal layout hold at most twice the factors' bytes? It holds R·(in + out)
    (down and a zero-padded up); the factors are R·in + Σ rᵢ·lengthᵢ."""
    rank = sum(down.shape[0] for _, _, _, down, _ in entries)
    ups = sum(down.shape[0] * length for _, length, _, down, _ in entries)
    return rank * out_features <= rank * entries[0][3].shape[1] + 2 * ups


class Additive(NamedTuple):
    """Forms that only add a term: the grouped low-rank ones and the rest, with their LoRA."""
    grouped: Optional[_Grouped]
    forms: Tuple[Tuple[Form, int], ...]


class OutputReading(NamedTuple):
    """One form that reads the output so far (DoRA, OFT, BOFT) and rewrites it."""
    form: Form
    lora: int


class ConvTerm(NamedTuple):
    """One conv form: additive, applied on its own."""
    form: Any
    lora: int


class TransientGroup(NamedTuple):
    """Slots whose delta the merge code forms per forward, in load order; ``prefix``: the module's
    slots before them, merged into W' first (only when ``reads_weight``)."""
    prefix: Tuple[AdapterSlot, ...]
    slots: Tuple[AdapterSlot, ...]
    reads_weight: bool


class _Built:
    """A hook's forms for one (device, dtype): segments in load order, and the bias they need."""

    __slots__ = ("segments", "bias")

    def __init__(self, segments, bias):
        self.segments = segments
        self.bias = bias

    def tensors(self) -> List[torch.Tensor]:
        out = [self.bias] if self.bias is not None else []
        for segment in self.segments:
            if isinstance(segment, Additive):
                out += segment.grouped.tensors() if segment.grouped is not None else []
                out += [t for form, _ in segment.forms for t in form.tensors()]
            else:
                out += segment.form.tensors()
        return out


class FusedBypassHook:
    """All bypass adapters of one module, applied by one forward hook."""

    def __init__(self, module: torch.nn.Module, module_path: str, slots: Sequence[AdapterSlot],
                 layout: str = "auto", mask_source: Optional[Callable[["FusedBypassHook", torch.Tensor],
                                                                       Optional[HookState]]] = None):
        if layout not in LAYOUTS:
            raise ValueError("layout %r: one of %s" % (layout, ", ".join(LAYOUTS)))
        undecided = [s.key for s in slots if s.decision is None or s.decision.fate not in (FACTORED, TRANSIENT)]
        if undecided:
            raise ValueError("slots without a factored or transient decision: %s" % (undecided,))
        self.module, self.module_path, self.slots = module, module_path, tuple(slots)
        self.layout, self.mask_source = layout, mask_source
        self.shape = logical_shape(module.weight)  # GGUF: the logical shape, not the blocks'
        self.linear = len(self.shape) == 2
        self.out_features = self.shape[0]
        self.in_features = int(math.prod(self.shape[1:]))
        self.trainable = tuple(s for s in self.slots if s.decision.fate == FACTORED and s.decision.form is None)
        ordered = [s for s in self.slots if s not in self.trainable]
        # the first transient whose delta reads W', or that an adapter after it reads (in W' or in
        # the output): from there on the module goes through the merge code, in load order
        first = next((i for i, s in enumerate(ordered) if s.decision.fate == TRANSIENT and (
            s.decision.reads_weight or any(_reads_earlier(t) for t in ordered[i + 1:]))), len(ordered))
        before, after = tuple(ordered[:first]), tuple(ordered[first:])
        self.form_slots = tuple((s, s.decision.form) for s in before if s.decision.fate == FACTORED)
        additive = tuple(s for s in before if s.decision.fate == TRANSIENT)  # nothing after reads them
        self.transient_groups = ((TransientGroup((), additive, False),) if additive else ()) + (
            (TransientGroup(before, after, any(weight_dependent(s.adapter) for s in after)),) if after else ())
        # adapters with a form that run through the merge code here, after a transient one in load order
        self.demoted = tuple(s for s in after if s.decision.fate == FACTORED)
        # LoRAs whose forms come before a form that reads W': switching one off changes what it read
        readers = [i for i, (_, cls) in enumerate(self.form_slots) if cls.needs_weight]
        self._read_by_later = frozenset(s.lora for s, _ in self.form_slots[:readers[-1]]) if readers else frozenset()
        self._built: Dict[Tuple[Any, Any, FrozenSet[int]], _Built] = {}
        self._handle = None
        self.weight_key = self.slots[0].target.weight_key
        self._scales: Dict[int, float] = {}  # id(slot) -> the scale later patches put on its term (compose)
        self._replay: Optional[Tuple[int, Tuple[AdapterSlot, ...]]] = None  # see later_patches.compose
        self._later: Tuple[tuple, ...] = ()  # the weight's patches, kept while replayed
        self._around: Tuple[tuple, tuple] = ((), ())  # (undo, redo) form slots of later merged LoRAs
        self._around_cache: Dict[tuple, Any] = {}
        self._named, self._said = False, ""
        self.calls = 0  # forward-hook runs: :mod:`.unhooked` tells whether a call reached the module

    # -- lifecycle -------------------------------------------------------------------
    def attach(self) -> None:
        """Register the forward hook; a hook of another patcher on this module is detached first."""
        if self._handle is not None:
            return
        other = self.module.__dict__.get(ACTIVE_HOOK_ATTR)
        if other is not None and other is not self:
            other.detach()
        self._handle = self.module.register_forward_hook(self._forward_hook, with_kwargs=True)
        self.module.__dict__[ACTIVE_HOOK_ATTR] = self

    def detach(self) -> None:
        """Remove the hook and drop the built forms: an unloaded model keeps no device memory."""
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        self._built.clear()
        self._later, self._around_cache = (), {}  # a merge's patches hold model2's weights: not kept past sampling
        if self.module.__dict__.get(ACTIVE_HOOK_ATTR) is self:
            del self.module.__dict__[ACTIVE_HOOK_ATTR]

    def compose(self, patches: Sequence[tuple]) -> Tuple[str, Optional[str]]:
        """Compose the patches the patcher added to this weight after its adapters were loaded, as
        ``calculate_weight`` composes them (:mod:`.later_patches`): additive adapters scaled by the
        later ``strength_model``; when an adapter that reads W' or the output has patches after it,
        those undone and redone around the forms (merged LoRAs with a factored form) or the module
        replayed through the merge code. Returns (how, the first time only: "factored" or
        "replayed"; what cannot be composed, the first time only), for the caller's lines."""
        plan = later_patches.compose([s for s in self.slots if s not in self.trainable], patches, _additive)
        replay, around = plan.replay, ((), ())
        if replay is not None and replay[1]:
            found = self._factored_around(patches, *replay)
            if found is not None:
                replay, around = None, found
        if plan.scales != self._scales or replay != self._replay or around != self._around:
            self._scales, self._replay, self._around = plan.scales, replay, around
            self._built.clear()
        self._later = tuple(patches) if replay is not None else ()
        named = None
        if plan.inexact and not self._named:
            self._named = True
            kinds = sorted({later_patches.adapter_kind(s.adapter) for s in plan.inexact})
            named = "%s (%s after %s: %s)" % (self.module_path, ", ".join(plan.blockers), ", ".join(kinds),
                                               ", ".join(sorted({str(s.key) for s in plan.inexact})))
        how = self.composition
        said, self._said = (how if how and how != self._said else ""), how or self._said
        return said, named

    @property
    def composition(self) -> str:
        """How patches added after this module's adapters are composed now: "factored" (undone and
        redone around the forms), "replayed" (the merge code, per forward) or "" (nothing to do
        beyond scales)."""
        return "factored" if self._around[0] else "replayed" if self._replay and self._replay[1] else ""

    def _factored_around(self, patches: Sequence[tuple], start: int, slots: Sequence[AdapterSlot]):
        """(undo, redo) when every adapter here is a Linear form loaded before every later patch and
        those are merged LoRAs with factored forms (:func:`.later_patches.around`), else None."""
        if not self.linear or self.transient_groups or len(slots) != len(self.form_slots) or any(
                s.patched != start for s in slots):
            return None
        key = (start,) + tuple(map(id, patches[start:]))
        if key not in self._around_cache:  # decided once per list of later patches
            self._around_cache = {key: later_patches.around(patches[start:], self.module, self.shape,
                                                            self.weight_key)}
        return self._around_cache[key]

    def _strength(self, slot: AdapterSlot) -> float:
        return slot.strength * self._scales.get(id(slot), 1.0)

    # -- what code written for stock's BypassForwardHook calls (tests/test_parity.py walks it) --
    inject = attach
    eject = detach

    @property
    def original_forward(self) -> Optional[Callable]:
        """Stock's: the forward it replaced, None when not injected. Ours never replaces
        ``forward`` (a torch hook runs after it), so: the module's forward while attached."""
        return self.module.forward if self._handle is not None else None

    @property
    def adapter_entries(self) -> List[Tuple[Any, float, Optional[Tuple[int, int, int]]]]:
        """``(adapter, strength, offset)`` per adapter, in load order (the 0.14.1 fork's form)."""
        return [(s.adapter, s.strength, s.target.offset) for s in self.slots]

    @property
    def adapter(self) -> Any:
        """Stock's single adapter: this module's first (all of them: ``adapter_entries``)."""
        return self.slots[0].adapter

    @property
    def multiplier(self) -> float:
        """Stock's single strength: the first adapter's."""
        return self.slots[0].strength

    def _move_adapter_weights_to_device(self, device, dtype=None) -> None:
        """What upstream's ``BypassInjectionManager.offload`` calls when the model is detached:
        trainable adapters (``nn.Module``) go to ``device``; inference adapters keep their factors
        where they are, and the forms built from them for a compute device are dropped (rebuilt
        by the next forward), so a detached model holds no adapter memory on its old device."""
        for slot in self.trainable:
            slot.adapter.to(device=device)
        self._built.clear()

    def held_bytes(self) -> int:
        """Bytes of every tensor this hook keeps between forwards (factors and vectors)."""
        seen = {}
        for built in self._built.values():
            for t in built.tensors():
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    # -- forward ---------------------------------------------------------------------
    def _forward_hook(self, module, args, kwargs, output):
        self.calls += 1
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise TypeError("[freefuse_bypass_patch] %s (%s): bypass needs the input and output tensors of its "
                            "forward, got input %s and output %s" % (self.module_path, type(module).__name__,
                                                                     type(x).__name__, type(output).__name__))
        return self.forward_output(x, output)

    def forward_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """What the hook returns for the module's input ``x`` and output: ``apply`` with this forward's
        state from the mask source. Also run for calls that compute with the module's weight without
        calling it (:mod:`.unhooked`)."""
        source = self.mask_source
        state = source(self, x) if source is not None else None
        if state is None:
            return self.apply(x, output)
        return self.apply(x, output, *state)

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
        if self._replay is not None:
            self._add_replayed(x, out, masks, off)
        else:
            self._add_loaded(x, out, masks, off)
        for slot in self.trainable:
            if slot.lora not in off:
                out = self._apply_trainable(slot, x, out)
        return out

    def _add_loaded(self, x: torch.Tensor, out: torch.Tensor, masks: Optional[LoraMasks],
                    off: FrozenSet[int]) -> None:
        """Every adapter as decided at load: forms, then transient groups."""
        if self.form_slots:
            self._add_forms(self._forms_for(out, off & self._read_by_later), x, out, masks, off)
        for group in self.transient_groups:
            self._add_transient(group, x, out, masks, off)

    def _forms_for(self, out: torch.Tensor, stale: FrozenSet[int]) -> _Built:
        """The built forms for this compute device and dtype. ``stale``: LoRAs switched off before a
        form that reads W': those forms are built without them (kept beside the usual build)."""
        key = (out.device, out.dtype, stale)
        built = self._built.get(key)
        if built is None:
            if stale:  # one such build at a time per device and dtype
                for other in [k for k in self._built if k[:2] == key[:2] and k[2]]:
                    del self._built[other]
            built = self._built[key] = self._build(out.device, out.dtype, out.is_cuda, stale)
        return built

    def _build(self, device, dtype, cuda: bool, without: FrozenSet[int] = frozenset()) -> _Built:
        """Forms in fp32 on the compute device, weight-reading ones prepared in load order, then cast."""
        undo, redo = self._around
        form_slots = [(s, cls) for s, cls in undo + self.form_slots + redo if s.lora not in without]
        if not self.linear:  # conv forms: additive, each applied on its own
            return _Built(tuple(ConvTerm(cls(s.adapter, self._strength(s), *out_rows(s.target, self.shape), self.module,
                                             device).cast(device, dtype), s.lora) for s, cls in form_slots), None)
        forms32, weight = [], None
        for slot, cls in form_slots:
            start, length = out_rows(slot.target, self.shape)
            form = cls(slot.adapter, self._strength(slot), start, length, self.in_features, device)
            if form.needs_weight:
                if weight is None:  # W' as this module's forward computes with it, read once per build
                    weight = read(self.module, device)[0].reshape(self.out_features, -1)
                form.prepare(effective_columns(_columns32(weight), self.in_features, forms32, (start, length),
                                              out_features=self.out_features))
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
            segments.append(Additive(grouped, rest))
            run.clear()

        for (slot, _), form in zip(form_slots, forms32):
            if form.reads_output:
                flush()
                segments.append(OutputReading(form.cast(device, dtype), slot.lora))
            else:
                run.append((form, slot.lora))
        flush()
        bias = None
        if any(isinstance(s, OutputReading) for s in segments) and getattr(self.module, "bias", None) is not None:
            bias = read_bias(self.module, device, dtype)
        return _Built(tuple(segments), bias)

    def _add_forms(self, built: _Built, x: torch.Tensor, out: torch.Tensor, masks: Optional[LoraMasks],
                   off: FrozenSet[int]) -> None:
        if not self.linear:
            xc = x if x.dtype == out.dtype else x.to(out.dtype)
            for segment in built.segments:
                if segment.lora not in off:
                    segment.form.add_(xc, out)
            return
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != out.dtype:
            x2 = x2.to(out.dtype)
        out2 = out.view(-1, out.shape[-1])
        if masks is not None and any(isinstance(s, OutputReading) for s in built.segments):
            return self._add_forms_tracked(built, x2, out2, masks, off)
        for segment in built.segments:
            if isinstance(segment, Additive):
                if segment.grouped is not None:
                    segment.grouped.add_(x2, out2, masks, off)
                for form, lora in segment.forms:
                    if lora not in off:
                        form.add_(x2, out2.narrow(1, form.start, form.length), masks(lora) if masks else None)
            elif segment.lora not in off:
                form = segment.form
                bias = built.bias.narrow(0, form.start, form.length) if built.bias is not None else None
                form.update_(x2, out2.narrow(1, form.start, form.length), bias)

    def _add_forms_tracked(self, built: _Built, x2, out2, masks: LoraMasks, off: FrozenSet[int]) -> None:
        """Masks with forms that read the output: those read y = W'x unmasked, tracked beside out."""
        y = out2 - built.bias if built.bias is not None else out2.clone()
        for segment in built.segments:
            if isinstance(segment, Additive):
                if segment.grouped is not None:
                    segment.grouped.add_(x2, y, None, off)
                    segment.grouped.add_(x2, out2, masks, off)
                pairs = segment.forms
            else:
                pairs = (segment,)
            for form, lora in pairs:
                if lora in off:
                    continue
                rows = y.narrow(1, form.start, form.length)
                d = form.contribution(x2, rows)
                rows.add_(d)
                add_masked(out2.narrow(1, form.start, form.length), d, masks(lora))

    def _add_transient(self, group: TransientGroup, x: torch.Tensor, out: torch.Tensor,
                       masks: Optional[LoraMasks], off: FrozenSet[int]) -> None:
        """Deltas from ComfyUI's merge code, in fp32, formed inside this forward and dropped; the
        LoRAs that are off are left out, as if they had never been loaded."""
        slots = tuple(replace(s, strength=self._strength(s)) if id(s) in self._scales else s
                      for s in group.slots if s.lora not in off)
        if not slots:
            return
        if group.reads_weight:
            current = read(self.module, out.device, torch.float32)[0]
            prefix = [s for s in group.prefix if s.lora not in off]
            if prefix:  # W' before the group: what the factored adapters before it add, merged here
                current = later_patches.merged(prefix, current.clone())
        else:
            current = torch.zeros(self.shape, device=out.device, dtype=torch.float32)
        steps = [slots] if masks is None else [(s,) for s in slots]
        xc = x if x.dtype == out.dtype else x.to(out.dtype)
        for step in steps:
            patched = later_patches.merged(step, current.clone())
            delta, current = (patched.to(torch.float32) - current).to(out.dtype), patched
            self._add_delta(xc, out, delta, masks(step[0].lora) if masks is not None and len(step) == 1 else None)
            del delta

    def _add_replayed(self, x: torch.Tensor, out: torch.Tensor, masks: Optional[LoraMasks],
                      off: FrozenSet[int]) -> None:
        """Patches after an adapter that reads W' or the output: each LoRA's delta where merged applies
        it among them (:func:`.later_patches.replay`), formed in this forward and dropped."""
        start, slots = self._replay
        if not slots or all(s.lora in off for s in slots):
            return
        weight = read(self.module, out.device, torch.float32)[0].reshape(self.shape)
        deltas = later_patches.replay(slots, self._later, start, weight, off, per_lora=masks is not None)
        del weight
        xc = x if x.dtype == out.dtype else x.to(out.dtype)
        for lora in list(deltas):
            self._add_delta(xc, out, deltas.pop(lora).to(out.dtype), masks(lora) if masks is not None else None)

    def _add_delta(self, xc: torch.Tensor, out: torch.Tensor, delta: torch.Tensor,
                   mask: Optional[torch.Tensor]) -> None:
        """out += the module's op with weight ``delta`` on ``xc``, scaled per token by ``mask`` (Linear only)."""
        term = _conv(self.module, xc, delta) if delta.dim() != 2 else F.linear(xc, delta)
        if mask is not None and term.dim() == out.dim() and delta.dim() == 2:
            term = term.reshape(-1, term.shape[-1]).mul_(mask).view(out.shape)
        out.add_(term)

    def _apply_trainable(self, slot: AdapterSlot, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """ComfyUI's own bypass contract for trainable adapters: g(f(x) + h(x))."""
        adapter = slot.adapter
        _set_module_info(adapter, self.module, slot.strength)
        h = adapter.h(x, out)
        if slot.target.offset is not None and slot.target.offset[0] == 0:
            out.narrow(-1, slot.target.offset[1], slot.target.offset[2]).add_(h)
            return out
        return adapter.g(out + h)


def _additive(slot: AdapterSlot) -> bool:
    """Is this adapter's term linear in its strength and free of W' and the output?"""
    d = slot.decision
    if d.fate == TRANSIENT:
        return not d.reads_weight
    return d.form is not None and not d.reads_weight and not getattr(d.form, "reads_output", False) \
        and not getattr(d.form, "needs_weight", False)


def _reads_earlier(slot: AdapterSlot) -> bool:
    """Does this slot read what the adapters before it did (W', or the output so far)?"""
    d = slot.decision
    return d.reads_weight or (d.fate == FACTORED and d.form is not None and d.form.reads_output)


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
