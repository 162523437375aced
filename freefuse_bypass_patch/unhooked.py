"""Bypass adapters on modules that ComfyUI computes with without calling them.

A bypass hook is a torch forward hook: it runs only when the module is called. Since 0.30,
``comfy.ops.linear_input_act(linear, x, act)`` (Wan ``ffn.2``, LTXV ``ff.net.2``, MiniMax
``fc2``, Llama ``down_proj``...) computes ``linear(act(x))`` by casting the weight and calling
``comfy_kitchen.int8_linear`` itself when the weight is INT8 tensor-wise, or ``F.linear`` when
the cast hands back a dequantized weight: the module is never called, so its adapters would be
silently lost. Here the stock function runs unchanged (the base stays on the INT8 kernel) and,
if the module's hook did not run during it, the hook's own ``forward_output`` adds the adapters
on the activated input, exactly as a forward hook would. When the stock function does call the
module (plain weights, training), the hook already ran and nothing is added twice.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .hooks import ACTIVE_HOOK_ATTR


def linear_input_act(stock: Callable[..., Any], linear: Any, x: Any, input_act: Any, *args, **kwargs) -> Any:
    """``stock(linear, x, input_act, ...)``, plus ``linear``'s bypass adapters if the call skipped its hook."""
    hook = linear.__dict__.get(ACTIVE_HOOK_ATTR) if isinstance(linear, torch.nn.Module) else None
    if hook is None or not hasattr(hook, "calls"):  # no hook, or one of a copy of this package without it
        return stock(linear, x, input_act, *args, **kwargs)
    calls = hook.calls
    out = stock(linear, x, input_act, *args, **kwargs)
    if hook.calls != calls:  # the module was called: its hook has added the adapters
        return out
    return hook.forward_output(activated(input_act, x, hook.module_path), out)


def activated(input_act: Any, x: torch.Tensor, module_path: str) -> torch.Tensor:
    """``act(x)`` by ComfyUI's own eager activation, what the module would have been called with."""
    import comfy.ops

    act = getattr(comfy.ops, "INPUT_ACT_EAGER", {}).get(input_act)
    if act is None:
        raise RuntimeError("[freefuse_bypass_patch] %s: linear_input_act with activation %r, which "
                           "comfy.ops.INPUT_ACT_EAGER does not define: its bypass adapters cannot be applied"
                           % (module_path, input_act))
    return act(x)
