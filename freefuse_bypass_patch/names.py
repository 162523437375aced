"""The names of a patcher's bypass LoRAs, in chain order: what masks and the switch are keyed by.

The loader names each LoRA it chains (the innermost :func:`lora_name` block, else
``lora_<position>``) and keeps the names on the patcher as an immutable tuple (an
attachment, replaced, never mutated, so clones keep their own). The loader needs only
this module; masks and the switch read it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Tuple, Type, Union

NAMES_ATTACHMENT = "freefuse_bypass_lora_names"  # tuple of LoRA names, in chain order

LoraKey = Union[int, str]  # a chain position or a name


def attachments(patcher) -> dict:
    """The patcher's attachments (an empty dict for anything that has none)."""
    return getattr(patcher, "attachments", None) or {}


def bypass_loras(patcher) -> List[str]:
    """Names of the bypass LoRAs on ``patcher``, in chain order (position = index)."""
    return list(attachments(patcher).get(NAMES_ATTACHMENT, ()))


@contextlib.contextmanager
def lora_name(name: str) -> Iterator[None]:
    """Name the bypass LoRA loaded inside this block (default: ``lora_<position>``)."""
    if not isinstance(name, str) or not name:
        raise ValueError("a LoRA name must be a non-empty string, got %r" % (name,))
    _pending.names.append(name)
    try:
        yield
    finally:
        _pending.names.pop()


class _Pending(threading.local):
    def __init__(self):
        self.names: List[str] = []


_pending = _Pending()


def next_name(names: Tuple[str, ...]) -> str:
    """The name for the next LoRA of a chain (the innermost ``lora_name`` block, else ``lora_<n>``)."""
    name = _pending.names[-1] if _pending.names else "lora_%d" % len(names)
    if name in names:
        raise ValueError("a bypass LoRA named %r is already on this model (%s)" % (name, ", ".join(names)))
    return name


def position(key: LoraKey, names: List[str], error: Type[ValueError] = ValueError) -> int:
    """The chain position ``key`` (a position or a name) stands for; ``error``, listing the chain, if none."""
    if not names:
        raise error("this patcher has no bypass LoRAs (load them with load_bypass_lora_for_models)")
    if isinstance(key, bool) or not isinstance(key, (int, str)) or \
            (isinstance(key, int) and not 0 <= key < len(names)) or (isinstance(key, str) and key not in names):
        raise error("no bypass LoRA %r on this patcher; its LoRAs: %s"
                    % (key, ", ".join("%d: %s" % item for item in enumerate(names))))
    return key if isinstance(key, int) else names.index(key)
