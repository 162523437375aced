"""Factor shapes a Linear form is known to build from, read off the factors without building it.

:mod:`.slots` probes every factored form on one zero token at load, so a factor that does
not fit is refused then, with its key and shapes. Building an OFT or BOFT form for that (on
the meta device) cost over ten times stock's whole load per adapter. :func:`fits` answers
True only for the factor shapes each form is sure to accept (exact shapes: no broadcasting,
no empty rank a scale divides by); anything else, including every factor that does not fit,
still goes to the probe, which decides and words the refusal. So the check is exactly as
strict as the probe: it only skips probes that would pass (tests/test_forms.py holds it to
that over a grid of shapes, fitting and not).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .forms import DORA_INDEX, BOFTForm, DoRAForm, LoKrForm, LoRAForm, OFTForm, _LoHaFactors, _plain_class


def fits(cls: type, adapter: Any, length: int, in_features: int) -> bool:
    """True when ``cls`` (a form of :mod:`.forms`, row-permuted or not) builds from ``adapter``'s
    factors and gives a term of ``length`` rows for an input of ``in_features``; False when not
    known (the probe decides)."""
    v = getattr(adapter, "weights", None)
    if not isinstance(v, (tuple, list)) or length <= 0 or in_features <= 0:
        return False
    if issubclass(cls, DoRAForm):  # the inner form's shapes, and one magnitude per row
        name = getattr(adapter, "name", None)
        inner = _plain_class(name, v, adapter, length, in_features) if name in DORA_INDEX else None
        dora = v[DORA_INDEX[name]] if inner is not None and len(v) > DORA_INDEX[name] else None
        return _floats(dora) and dora.numel() == length and _plain_fits(inner, v, length, in_features)
    return _plain_fits(cls, v, length, in_features)


def _plain_fits(cls: type, v: Sequence[Any], length: int, in_features: int) -> bool:
    for base, check in _CHECKS:
        if issubclass(cls, base):
            return check(v, length, in_features)
    return False  # GLoRA and anything else: probed


def _floats(*tensors: Optional[torch.Tensor]) -> bool:
    return all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors)


def _number(alpha: Any) -> bool:
    """An alpha the forms read with ``float()`` (load_lora gives a float or None)."""
    return alpha is None or (isinstance(alpha, (int, float)) and not isinstance(alpha, bool))


def _dims(t: torch.Tensor, *shape: int) -> bool:
    return tuple(t.shape) == shape


def _lora(v, length, in_features) -> bool:
    """up (length, r) · down (r, in)."""
    if len(v) < 3 or not _floats(v[0], v[1]) or not _number(v[2]) or v[0].dim() != 2:
        return False
    rank = v[0].shape[1]
    return rank > 0 and _dims(v[0], length, rank) and _dims(v[1], rank, in_features)


def _loha(v, length, in_features) -> bool:
    """(w1a (length, r1) · w1b (r1, in)) ⊙ (w2a (length, r2) · w2b (r2, in))."""
    if len(v) < 5 or not _floats(v[0], v[1], v[3], v[4]) or not _number(v[2]) \
            or v[0].dim() != 2 or v[3].dim() != 2:
        return False
    r1, r2 = v[0].shape[1], v[3].shape[1]
    return r1 > 0 and r2 > 0 and _dims(v[0], length, r1) and _dims(v[1], r1, in_features) \
        and _dims(v[3], length, r2) and _dims(v[4], r2, in_features)


def _lokr(v, length, in_features) -> bool:
    """kron(w1 (or w1a · w1b), w2 (or w2a · w2b)) of (length, in): each part 2-D, inner ranks equal
    and non-zero (the scale divides by the last pair's rank)."""
    if len(v) < 8 or v[7] is not None or not _number(v[2]):
        return False
    w1, w2, _, w1a, w1b, w2a, w2b = v[:7]
    parts = []
    for full, a, b in ((w1, w1a, w1b), (w2, w2a, w2b)):
        if full is not None:
            if not _floats(full) or full.dim() != 2:
                return False
            parts.append(tuple(full.shape))
            continue
        if not _floats(a, b) or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or b.shape[0] == 0:
            return False
        parts.append((a.shape[0], b.shape[1]))
    (rows1, cols1), (rows2, cols2) = parts
    return min(rows1, cols1, rows2, cols2) > 0 and rows1 * rows2 == length and cols1 * cols2 == in_features


def _oft(v, length, in_features) -> bool:
    """blocks (K, n, n) with K·n = length."""
    if len(v) < 3 or not _floats(v[0]) or not _number(v[2]) or v[0].dim() != 3:
        return False
    k, n, m = v[0].shape
    return n == m and k > 0 and n > 0 and k * n == length


def _boft(v, length, in_features) -> bool:
    """blocks (stages, K, n, n), n even, K·n = length, and every butterfly stage's pairing of
    2^i·n/2 rows dividing the rows; rescale None or one per row."""
    if len(v) < 3 or not _floats(v[0]) or v[0].dim() != 4 or v[2] is None or not _number(v[2]):
        return False
    stages, k, n, m = v[0].shape
    if not (n == m and stages > 0 and k > 0 and n >= 2 and n % 2 == 0 and k * n == length):
        return False
    if length % (2 ** stages * (n // 2)):
        return False
    rescale = v[1]
    return rescale is None or (_floats(rescale) and rescale.numel() == length)


_CHECKS = ((LoRAForm, _lora), (_LoHaFactors, _loha), (LoKrForm, _lokr), (OFTForm, _oft), (BOFTForm, _boft))
