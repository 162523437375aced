"""The weight a module computes with, read the way ComfyUI reads it for that module's forward.

Forms that depend on the weight (DoRA's row norms, GLoRA's W'·A, the transient merge-code
delta) and forms that read the output minus the bias (OFT, BOFT, DoRA) need W' and b as the
forward uses them: dequantized, with the patches ComfyUI applies at cast time (a merged LoRA
under lowvram or DynamicVRAM, ComfyUI-GGUF's per-tensor ``patches``). The raw attribute is
wrong for all of these: under lowvram ``module.weight`` is the base weight; ComfyUI-GGUF's
``GGMLTensor`` holds block bytes (torch's own ``dequantize()`` on it returns those bytes as
floats), and its ``state_dict()`` holds meta tensors in the storage shape.

So the values come from the module's own cast path:

* a module with its own ``cast_bias_weight`` method (ComfyUI-GGUF's ``GGMLLayer``);
* a ComfyUI op (``comfy.ops.CastWeightBiasOp``): ``comfy.ops.cast_bias_weight(module, ...)``;
* no cast path: plain tensors are read as they are.

A tensor subclass with no cast path cannot be read: :func:`unreadable` names it at load,
and the adapters that need W' are refused there. Shapes come from ``tensor.shape``, which
is the logical shape for every type above (``size()`` and ``dim()`` may be the storage's).
"""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_COMPUTE_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def logical_shape(tensor: torch.Tensor) -> Tuple[int, ...]:
    """The shape a module computes with (GGUF: ``tensor_shape``, not the block storage)."""
    return tuple(map(int, tensor.shape))


def _plain(tensor: Optional[torch.Tensor]) -> bool:
    return tensor is None or type(tensor) in _PLAIN


def _comfy_op(module: torch.nn.Module) -> bool:
    ops = sys.modules.get("comfy.ops")
    op_class = getattr(ops, "CastWeightBiasOp", None)
    return op_class is not None and isinstance(module, op_class)


def _own_cast(module: torch.nn.Module) -> bool:
    return callable(getattr(type(module), "cast_bias_weight", None))


def unreadable(module: torch.nn.Module, part: str = "weight") -> Optional[str]:
    """None if this module's effective ``part`` ("weight" or "bias") can be read, else why not."""
    if _own_cast(module) or _comfy_op(module):
        return None
    tensor = getattr(module, part, None)
    if _plain(tensor):
        return None
    return "%s.%s is a %s with no cast path (not a ComfyUI op, no cast_bias_weight)" % (
        type(module).__name__, part, describe(tensor))


def describe(tensor: Optional[torch.Tensor]) -> str:
    """A weight's type for messages, e.g. ``GGMLTensor Q4_K (768, 256)``."""
    if tensor is None:
        return "None"
    kind = getattr(tensor, "tensor_type", None)
    kind = " " + getattr(kind, "name", str(kind)) if kind is not None else ""
    return "%s%s %s %s" % (type(tensor).__name__, kind, tensor.dtype, logical_shape(tensor))


def read(module: torch.nn.Module, device, dtype: Optional[torch.dtype] = None
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W', b) on ``device`` as this module's forward would compute with them. Read-only:
    either may be the module's own parameter. ``dtype`` defaults to the weight's own float
    dtype when it is a plain fp32/fp16/bf16 tensor (no copy when no patch applies), else fp32.

    Raises TypeError for a module :func:`unreadable` names (checked at load, never reached).
    """
    weight = module.weight
    if dtype is None:
        dtype = weight.dtype if _plain(weight) and weight.dtype in _COMPUTE_FLOATS else torch.float32
    if _own_cast(module):  # ComfyUI-GGUF: dequantize, then its own patches
        w, b = module.cast_bias_weight(None, dtype=dtype, device=device, bias_dtype=dtype)[:2]
    elif _comfy_op(module):  # ComfyUI: dequantize (QuantizedTensor), then weight_function patches
        w, b = _comfy_cast(module, device, dtype)
    else:
        for part in ("weight", "bias"):
            reason = unreadable(module, part)
            if reason is not None:
                raise TypeError(reason)
        bias = getattr(module, "bias", None)
        w = weight.to(device=device, dtype=dtype)
        b = bias.to(device=device, dtype=dtype) if bias is not None else None
    w = _dequantized(w).to(dtype).detach()
    return w, (_dequantized(b).to(dtype).detach() if b is not None else None)


def _comfy_cast(module: torch.nn.Module, device, dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``comfy.ops.cast_bias_weight`` paired with ``uncast_bias_weight``, as ComfyUI's own ops pair
    them: under DynamicVRAM the cast pins the module's vbar (and may fill a shared cast buffer) until
    the uncast. What came from such a buffer or pin is copied before it is released."""
    import comfy.ops

    uncast = getattr(comfy.ops, "uncast_bias_weight", None)
    if uncast is None:  # a ComfyUI before async offload: nothing to release
        return comfy.ops.cast_bias_weight(module, None, dtype=dtype, device=device, bias_dtype=dtype)[:2]
    w, b, stream = comfy.ops.cast_bias_weight(module, None, dtype=dtype, device=device, bias_dtype=dtype,
                                              offloadable=True)
    try:
        borrowed = stream is not None and (stream[0] is not None or (
            stream[1] is not None and not isinstance(stream[1], torch.Tensor)))  # a cast buffer or a vbar pin
        if borrowed:
            return _dequantized(w).to(dtype).clone(), (b.to(dtype).clone() if b is not None else None)
        return w, b
    finally:
        uncast(module, w, b, stream)


def read_bias(module: torch.nn.Module, device, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The effective bias alone: through the cast path where there is one, else as it is
    (a weight that cannot be read does not stop OFT or BOFT, which need only the bias)."""
    if module.bias is None:
        return None
    if _own_cast(module) or _comfy_op(module):
        return read(module, device, dtype)[1]
    reason = unreadable(module, "bias")
    if reason is not None:
        raise TypeError(reason)
    return module.bias.detach().to(device=device, dtype=dtype)


def _dequantized(tensor: torch.Tensor) -> torch.Tensor:
    """ComfyUI's QuantizedTensor stays quantized through ``.to(dtype)`` when the dtype it reports
    already matches; the cast path then hands it on, and ComfyUI's own ``dequantize()`` is right."""
    quant_ops = sys.modules.get("comfy.quant_ops")
    quantized = getattr(quant_ops, "QuantizedTensor", None)
    if isinstance(quantized, type) and isinstance(tensor, quantized):
        return tensor.dequantize()
    return tensor
