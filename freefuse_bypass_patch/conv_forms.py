"""Factored forms of LoRA (LoCon, plain or Tucker) and LoKr on Conv1d/2d/3d.

Same contract as :mod:`.forms`, on output channels: ``contribution(x)`` is the term a conv
adapter adds for input ``x`` (B, C_in, ...), computed by convolutions with the factors,
never the full kernel delta. Where ComfyUI's merge code has a quirk (a Tucker LoCon only on
Conv2d; a LoKr whose full w2 is not 4-D is Kronecker-padded in front) there is no form, and
the adapter takes the merge code's own transient delta (:mod:`.slots`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .forms import DORA_INDEX, Form, alpha_over, lokr_factors, to32


class ConvForm:
    """An adapter on output channels ``[start, start + length)`` of a Conv1d/2d/3d."""

    reads_output = False  # conv forms only add a term
    needs_weight = False

    def __init__(self, adapter: Any, strength: float, start: int, length: int, module: torch.nn.Module, device):
        self.strength, self.start, self.length, self.device = float(strength), start, length, device
        dims = len(module.weight.shape) - 2
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        self.kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)

    cast = Form.cast
    tensors = Form.tensors

    def add_(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (B, C_out, ...) += the term on this form's output channels."""
        out.narrow(1, self.start, self.length).add_(self.contribution(x))


class ConvLoRAForm(ConvForm):
    """LoCon: ΔW = (α/r)·up·down (optionally down → Tucker mid): conv by down (and mid), then 1x1 up."""

    def __init__(self, adapter, strength, start, length, module, device):
        super().__init__(adapter, strength, start, length, module, device)
        up, down, alpha, mid = adapter.weights[:4]
        self.up, self.down, self.mid = to32(up, device), to32(down, device), to32(mid, device)
        self.scale = self.strength * alpha_over(alpha, down.shape[0])

    @staticmethod
    def fits(adapter, module) -> bool:
        up, down, _, mid, _, reshape = adapter.weights[:6]
        ones = all(k == 1 for k in up.shape[2:])
        if mid is not None and len(module.weight.shape) != 4:
            return False  # the merge code builds a Tucker core for Conv2d only (and fails on the others)
        if mid is not None:
            ones = ones and all(k == 1 for k in down.shape[2:]) and mid.shape[2:] == module.weight.shape[2:]
        else:
            ones = ones and down.shape[2:] == module.weight.shape[2:]
        return reshape is None and up.dim() == len(module.weight.shape) and ones

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        if self.mid is None:
            z = self.conv(x, self.down, **self.kw)
        else:
            z = self.conv(self.conv(x, self.down), self.mid, **self.kw)
        return self.conv(z, self.up * self.scale)


class ConvLoKrForm(ConvForm):
    """Conv LoKr: kron(w1, w2) * x = w1 across the in1 input groups of (w2 * each group)."""

    def __init__(self, adapter, strength, start, length, module, device):
        super().__init__(adapter, strength, start, length, module, device)
        w1, w2, low, scale = lokr_factors(adapter, device)
        self.w1 = w1.flatten(1)
        self.w2 = w2 if low is None else low[0] @ low[1]
        if self.w2.dim() != len(module.weight.shape):
            self.w2 = self.w2.reshape(*self.w2.shape[:2], *module.weight.shape[2:])
        self.scale = self.strength * scale

    @staticmethod
    def fits(adapter, module, length: int) -> bool:
        w1, w2, _, w1a, w1b, w2a, w2b, t2 = adapter.weights[:8]
        kernel = tuple(module.weight.shape[2:])
        rows1, cols1 = (w1.shape if w1 is not None else (w1a.shape[0], w1b.shape[1]))[:2]
        if t2 is not None:
            return False  # the merge code fails on a Tucker LoKr (and leaves the weight): so does the fallback
        if w2 is not None and w2.dim() != 4:
            return False  # the merge code unsqueezes w1 for a 4-D w2 only; its kron of 3-D/5-D pads w1 in front
        if w2 is not None:
            rows2, cols2, k2 = w2.shape[0], w2.shape[1], tuple(w2.shape[2:])
        else:
            rows2, cols2, k2 = w2a.shape[0], w2b.shape[1], ()
        if k2 != kernel and not (k2 == () and all(k == 1 for k in kernel)):
            return False  # the merge code cannot reshape this kron to the weight either
        return rows1 * rows2 == length and cols1 * cols2 == module.weight.shape[1] and (w1 is None or w1.dim() == 2)

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.w1.shape[1]
        z = self.conv(x.reshape(x.shape[0] * groups, -1, *x.shape[2:]), self.w2, **self.kw)
        z = z.reshape(x.shape[0], groups, *z.shape[1:])  # (B, in1, out2, ...)
        return torch.einsum("ij,bj...->bi...", self.w1 * self.scale, z).flatten(1, 2)


def conv_form_class(adapter: Any, module: torch.nn.Module, length: int) -> Optional[type]:
    """The factored form of a plain LoCon or LoKr on a conv (groups 1, zero padding), or None."""
    name, v = getattr(adapter, "name", None), getattr(adapter, "weights", None)
    if getattr(module, "groups", 1) != 1 or getattr(module, "padding_mode", "zeros") != "zeros" \
            or not isinstance(v, (tuple, list)) or name not in ("lora", "lokr"):
        return None
    if v[DORA_INDEX[name]] is not None or len(module.weight.shape) not in (3, 4, 5):
        return None
    if name == "lora":
        return ConvLoRAForm if ConvLoRAForm.fits(adapter, module) else None
    return ConvLoKrForm if ConvLoKrForm.fits(adapter, module, length) else None
