"""The three key forms that ``comfy.lora.load_lora`` returns, reduced to one record.

``load_lora`` keys a patch by the weight it targets:

* ``"diffusion_model.x.weight"``: the whole weight;
* ``("diffusion_model.x.weight", (dim, start, length))``: a slice of a fused weight
  (Flux ``qkv``/``linear1``, SD3, PixArt, Lumina2);
* ``("diffusion_model.x.weight", None, fn)``: the whole weight, with ``fn`` applied to
  the diff before it is added (Flux ``norm_out.linear`` -> ``swap_scale_shift``).

Stock bypass compares the raw key with a set of strings, so the tuple forms never match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

Offset = Tuple[int, int, int]


class BypassKeyError(ValueError):
    """A LoRA key, or its factors, cannot be applied to the model's weight."""


@dataclass(frozen=True)
class Target:
    """Where one adapter goes: a weight, an optional slice of it, an optional diff function."""

    weight_key: str
    offset: Optional[Offset] = None
    function: Optional[Callable[[Any], Any]] = None

    @property
    def module_path(self) -> str:
        """The submodule that owns the weight (``a.b.weight`` -> ``a.b``)."""
        if self.weight_key.endswith(".weight"):
            return self.weight_key[: -len(".weight")]
        return self.weight_key

    def describe(self) -> str:
        parts = [self.weight_key]
        if self.offset is not None:
            parts.append("slice(dim=%d, start=%d, length=%d)" % self.offset)
        if self.function is not None:
            parts.append("fn=%s" % getattr(self.function, "__name__", repr(self.function)))
        return " ".join(parts)


def parse_target(key: Any, offset: Optional[Offset] = None) -> Target:
    """Normalise any ``load_lora`` key (plus an explicit ``offset``, as the 0.14.1 fork passes it)."""
    function = None
    if isinstance(key, tuple):
        if not key or not isinstance(key[0], str) or len(key) > 3:
            raise BypassKeyError("unsupported LoRA target key %r" % (key,))
        weight_key = key[0]
        if len(key) > 1 and key[1] is not None:
            if offset is not None and tuple(offset) != tuple(key[1]):
                raise BypassKeyError("%r: offset given twice (%r and %r)" % (key, key[1], offset))
            offset = key[1]
        if len(key) > 2:
            function = key[2]
    elif isinstance(key, str):
        weight_key = key
    else:
        raise BypassKeyError("unsupported LoRA target key %r" % (key,))

    if offset is not None:
        try:
            dim, start, length = (int(v) for v in offset)
        except (TypeError, ValueError):
            raise BypassKeyError("%r: offset %r is not (dim, start, length)" % (key, offset)) from None
        if start < 0 or length <= 0:
            raise BypassKeyError("%r: empty or negative slice %r" % (key, offset))
        offset = (dim, start, length)
    if function is not None and not callable(function):
        raise BypassKeyError("%r: diff function %r is not callable" % (key, function))
    return Target(weight_key, offset, function)
