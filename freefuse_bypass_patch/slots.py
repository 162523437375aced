"""What each adapter becomes, decided once, at load: the plugin's one decision table.

For every adapter on every target (whole weight, output slice, input slice, diff function)
of every module (Linear, Conv1d/2d/3d, anything else), :func:`decide` returns one
:class:`Decision`:

* ``factored``: a form of :mod:`.forms`/:mod:`.conv_forms`, built from the factors only; factors
  of the shapes the form takes (:mod:`.form_shapes`) are known to fit, any others are probed here
  on one zero token, so a factor that does not fit fails now, not in a forward;
  ComfyUI's trainable adapters (``nn.Module``) keep their own ``h``/``g`` under this fate;
* ``transient``: no factored form; ComfyUI's merge code forms the delta inside each forward
  (fp32, dropped at once). It is run here once on the meta device (no memory; on the CPU for
  the rare op with no meta kernel), so what merged cannot apply is refused now, as merged
  skips it, instead of failing (and logging) in every forward;
* ``merged``: the adapter changes what a hook cannot change (a control LoRA's ``reshape``
  pads the weight; a module that is not a Linear or a conv): the loader hands it to
  ``add_patches``, as merged does;
* ``refused``: with the reason (the key and the shapes), logged once by the caller.

The loader, the manager (ComfyUI's trainer and other plugins) and ``check --lora`` all read
this table, so what the dry run predicts is what a load does.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Tuple

import torch

from . import form_shapes
from .conv_forms import conv_form_class
from .forms import DORA_INDEX, LoRAForm, form_class, permuted_rows, row_permutation
from .keys import BypassKeyError, Target
from .weights import unreadable

FACTORED, TRANSIENT, MERGED, REFUSED = "factored", "transient", "merged", "refused"
# What a forward hook can add to: y = W x + b or a convolution. Op sets mirror torch's class names
# (ComfyUI's mixed-precision Linear is a plain nn.Module), so a class of that name counts too.
HOOKABLE = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def hookable(module: torch.nn.Module) -> bool:
    return any(cls.__name__ in HOOKABLE for cls in type(module).__mro__)


@dataclass(frozen=True)
class Decision:
    """One adapter's fate; ``form`` for factored ones (None: a trainable adapter's own h/g)."""

    fate: str
    form: Optional[type] = None
    reason: str = ""
    reads_weight: bool = False  # the forward reads W' (DoRA, GLoRA, a weight-dependent transient)
    reads_bias: bool = False  # the forward reads b (forms that read the output)
    unreadable: bool = False  # refused because this model's weight cannot be read (not the file's fault)


@dataclass(frozen=True)
class AdapterSlot:
    """One adapter bound to one target, with the strength it was loaded at and its decision."""

    key: Any  # the load_lora key, for messages
    target: Target
    adapter: Any
    strength: float
    lora: int = 0  # chain position of the LoRA it came from (masks, the switch)
    decision: Optional[Decision] = None
    patched: int = -1  # patches its weight had on the patcher when it was loaded (-1: not known)


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


def out_rows(target: Target, weight_shape: Sequence[int]) -> Tuple[int, int]:
    """(start, length) of the output rows a target writes; raises if the slice is outside."""
    if target.offset is None:
        return 0, int(weight_shape[0])
    dim, start, length = target.offset
    if dim < 0 or dim >= len(weight_shape) or start + length > weight_shape[dim]:
        raise BypassKeyError("%s: slice outside weight of shape %s" % (target.describe(), tuple(weight_shape)))
    if dim != 0:
        return 0, int(weight_shape[0])
    return start, length


def decide(slot: AdapterSlot, module: Optional[torch.nn.Module], weight_shape: Sequence[int],
           can_merge: bool = True) -> Decision:
    """The table: what ``slot`` becomes on ``module`` (None: the target is no module's weight),
    whose weight has the logical ``weight_shape``. ``can_merge``: the caller can hand an
    adapter to ``add_patches`` (the loader can; a bare BypassInjectionManager cannot)."""
    adapter = slot.adapter
    if is_trainable(adapter):
        return Decision(FACTORED, reason="trainable: its own h/g")
    weights = getattr(adapter, "weights", None) or ()
    if getattr(adapter, "name", None) == "lora" and len(weights) > 5 and weights[5] is not None:
        return _merged("it reshapes the weight (a control LoRA's reshape_weight)", can_merge)
    if module is None or not hookable(module):
        what = "no module's weight" if module is None else "a %s, not a Linear or conv" % type(module).__name__
        return _merged("%s is %s: no forward hook adds to it" % (slot.target.weight_key, what), can_merge)
    try:
        return _readable(_fate(slot, module, weight_shape), slot, module)
    except BypassKeyError as err:
        return Decision(REFUSED, reason=str(err))


def _merged(why: str, can_merge: bool) -> Decision:
    if can_merge:
        return Decision(MERGED, reason=why + "; merged as ComfyUI merges it")
    return Decision(REFUSED, reason=why + "; a bypass manager cannot merge it")


def _fate(slot: AdapterSlot, module: torch.nn.Module, shape: Sequence[int]) -> Decision:
    target, adapter = slot.target, slot.adapter
    start, length = out_rows(target, shape)
    in_features = int(math.prod(shape[1:]))
    whole_rows = target.function is None and (target.offset is None or target.offset[0] == 0)
    perm = None  # a diff function that only permutes rows (swap_scale_shift): a factored form too
    if target.function is not None and target.offset is None and len(shape) == 2:
        perm = row_permutation(target.function, int(shape[0]))
    cls = None
    checked = False  # a plain LoRA whose up and down were checked against the rows and the width
    if whole_rows or perm is not None:
        checked = _check_lora_shapes(slot, shape, length, in_features)
        cls = form_class(adapter, length, in_features) if len(shape) == 2 else conv_form_class(adapter, module, length)
        if perm is not None and cls is not None:
            cls = permuted_rows(cls, perm)
    if cls is not None and len(shape) == 2:
        # a plain LoRA's shape check says it all; other shapes known to fit need no probe either
        if not (checked and issubclass(cls, LoRAForm)) and not form_shapes.fits(cls, adapter, length, in_features):
            _probe_form(slot, cls, start, length, in_features, shape)
        has_bias = getattr(module, "bias", None) is not None
        return Decision(FACTORED, form=cls, reads_weight=cls.needs_weight, reads_bias=has_bias and cls.reads_output)
    error = _probe_merge(slot, shape)  # conv forms too: merged checks their channels (forms follow its quirks)
    if cls is not None and error is None:
        return Decision(FACTORED, form=cls)
    if error is not None:
        raise BypassKeyError("%s key %r on %s (weight %s): ComfyUI's merge code cannot apply it either "
                             "(merged skips it): %s" % (type(adapter).__name__, slot.key, target.describe(),
                                                        tuple(shape), error))
    return Decision(TRANSIENT, reason=_why_transient(slot, shape, whole_rows),
                    reads_weight=weight_dependent(adapter))


def _check_lora_shapes(slot: AdapterSlot, shape, length: int, in_features: int) -> bool:
    """A plain LoRA's up and down against the rows and the width they patch: True when they were
    checked (and fit), False when this is no plain 2-D LoRA; raises when they do not fit."""
    weights = getattr(slot.adapter, "weights", ())
    if getattr(slot.adapter, "name", None) != "lora" or len(weights) < 2 or any(
            w is not None for w in weights[3:6]):
        return False
    up, down = weights[0], weights[1]
    if up.dim() != 2 or down.dim() != 2:
        return False
    if up.shape[1] != down.shape[0] or up.shape[0] != length or down.shape[1] != in_features:
        raise BypassKeyError("LoRA key %r: up %s x down %s does not fit %s (needs (%d, r) x (r, %d); weight %s)"
                             % (slot.key, tuple(up.shape), tuple(down.shape), slot.target.describe(), length,
                                in_features, tuple(shape)))
    return True


def _probe_form(slot: AdapterSlot, cls: type, start: int, length: int, in_features: int, shape) -> None:
    """Build the form on one zero token: a factor that does not fit fails here, with the shapes.

    On the CPU from the factors (small); OFT and BOFT on the meta device instead, with their value
    branch taken off as for the merge code: on the CPU they would invert every block at load. A
    form that meta cannot build is probed again on the CPU, which decides."""
    try:
        if getattr(slot.adapter, "name", None) in ("oft", "boft"):
            try:
                return _form_term(_without_value_branches(slot.adapter), slot.strength, cls, start, length,
                                  in_features, torch.device("meta"))
            except Exception:
                pass
        _form_term(slot.adapter, slot.strength, cls, start, length, in_features, torch.device("cpu"))
    except Exception as err:
        raise BypassKeyError("%s key %r: factors %s do not fit %s (weight %s): %s"
                             % (type(slot.adapter).__name__, slot.key, _factor_shapes(slot.adapter),
                                slot.target.describe(), tuple(shape), err)) from None


def _form_term(adapter, strength: float, cls: type, start: int, length: int, in_features: int, device) -> None:
    form = cls(adapter, strength, start, length, in_features, device)
    if form.needs_weight:  # one zero column of the weight: shapes checked, no full-size work
        form.prepare(lambda: iter([(0, 1, torch.zeros(1, length, device=device))]))
    term = form.contribution(torch.zeros(1, in_features, device=device), torch.zeros(1, length, device=device))
    if tuple(term.shape) != (1, length):
        raise ValueError("its term has shape %s" % (tuple(term.shape[1:]),))


def _probe_merge(slot: AdapterSlot, shape: Sequence[int]) -> Optional[str]:
    """None if ComfyUI's merge code applies the slot to a weight of ``shape``, else its error.

    On the meta device (shapes only, no memory). OFT and BOFT branch on a value there (``norm(q)
    > alpha``, the constraint that rescales q), which the meta device cannot take: they are
    probed with alpha 0, the branch-free path, whose shapes are the same. Only what still needs
    a value is retried on a CPU zero weight (no adapter type ComfyUI ships).
    """
    import comfy.lora

    error = None
    for device in ("meta", "cpu"):
        adapter = slot.adapter if device == "cpu" else _without_value_branches(slot.adapter)
        patch = [(slot.strength or 1.0, adapter, 1.0, slot.target.offset, slot.target.function)]
        weight = torch.zeros(tuple(shape), device=device, dtype=torch.float32)
        with _MergeErrors() as errors:
            try:
                out = comfy.lora.calculate_weight(patch, weight, slot.target.weight_key,
                                                  intermediate_dtype=torch.float32)
                if tuple(out.shape) != tuple(shape):
                    errors.append("it gives a weight of shape %s" % (tuple(out.shape),))
            except Exception as err:  # some merge-code failures raise, most are logged
                errors.append("%s: %s" % (type(err).__name__, err))
        error = errors[0] if errors else None
        if error is None or device == "cpu" or "meta" not in error.lower():
            return error
    return error


def _without_value_branches(adapter: Any) -> Any:
    """OFT/BOFT with alpha > 0 as the same adapter with alpha 0: the merge code then skips the
    norm constraint, a branch on a value; every shape it checks is the same. Others as they are."""
    weights = getattr(adapter, "weights", None)
    if getattr(adapter, "name", None) not in ("oft", "boft") or not isinstance(weights, (tuple, list)) \
            or len(weights) < 3 or weights[2] is None or not float(weights[2]) > 0:
        return adapter
    probe = copy.copy(adapter)
    probe.weights = type(weights)(list(weights[:2]) + [0.0] + list(weights[3:]))
    return probe


class _MergeErrors(logging.Handler):
    """Collects (and holds back) what ComfyUI's merge code logs at ERROR while a probe runs: the
    caller reports the failure once, in its own words. A handler on the root logger, with the root's
    other handlers held back, sees the root's records and every module logger's (0.12.1's
    ``weight_adapter`` modules log through ``getLogger(__name__)``; a filter on the root logger
    itself would miss those)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []
        self._held = ()

    def emit(self, record):
        self.messages.append(record.getMessage())

    @staticmethod
    def _below_error(record):
        return record.levelno < logging.ERROR

    def __enter__(self):
        root = logging.getLogger()
        self._held = tuple(root.handlers)
        for handler in self._held:
            handler.addFilter(self._below_error)
        root.addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self)
        for handler in self._held:
            handler.removeFilter(self._below_error)


def _why_transient(slot: AdapterSlot, shape: Sequence[int], whole_rows: bool) -> str:
    """Why an adapter has no factored form, for the load-time summary and ``check --lora``."""
    target, adapter = slot.target, slot.adapter
    if target.function is not None:
        return "a diff function (%s)" % getattr(target.function, "__name__", "fn")
    if not whole_rows:
        return "a slice on the input axis"
    name = getattr(adapter, "name", None)
    kind = type(adapter).__name__.replace("Adapter", "")
    weights = getattr(adapter, "weights", None) or ()
    dora = weights[DORA_INDEX[name]] if name in DORA_INDEX and len(weights) > DORA_INDEX[name] else None
    if dora is not None and dora.dim() >= 2 and dora.shape[0] != shape[0] and dora.shape[0] == 1:
        return "DoRA on the input axis"
    if dora is not None and dora.dim() < 2:
        return "a 1-D dora_scale (merged broadcasts it against the row norms)"
    if len(shape) != 2:
        return "%s on a Conv%dd" % (kind, len(shape) - 2)
    tucker = {"loha": (5, 6), "lokr": (7,)}.get(name, ())  # where load() keeps the Tucker cores
    if any(i < len(weights) and weights[i] is not None for i in tucker):
        return "a Tucker %s" % kind
    if name not in DORA_INDEX:
        return "adapter type %s" % kind
    return "%s with these factor shapes (%s)" % (kind, _factor_shapes(adapter))


def _factor_shapes(adapter) -> str:
    return ", ".join(str(tuple(t.shape)) for t in getattr(adapter, "weights", ()) if isinstance(t, torch.Tensor))


def _readable(decision: Decision, slot: AdapterSlot, module: torch.nn.Module) -> Decision:
    """The decision, or a refusal if it needs a weight or bias of this module that cannot be read."""
    for part, needed in (("weight", decision.reads_weight), ("bias", decision.reads_bias)):
        reason = unreadable(module, part) if needed else None
        if reason is not None:
            return Decision(REFUSED, reason="%s key %r needs the %s it patches to be read, but %s"
                            % (type(slot.adapter).__name__, slot.key, part, reason), unreadable=True)
    return decision


def decided(slot: AdapterSlot, module: Optional[torch.nn.Module], weight_shape: Sequence[int],
            can_merge: bool = True) -> AdapterSlot:
    """``slot`` with its decision (kept when it has one: a chain's earlier LoRAs were decided at their load)."""
    if slot.decision is not None:
        return slot
    return AdapterSlot(slot.key, slot.target, slot.adapter, slot.strength, slot.lora,
                       decide(slot, module, weight_shape, can_merge), slot.patched)  # replace(), without its cost
