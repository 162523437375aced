"""Dry run for one LoRA file: what a load does with it, adapter by adapter, without a model file.

The model is built on the meta device (every module and shape, no weights) by ComfyUI's own
classes, at the sizes the LoRA file shows: for the families with Flux's block layout the
released model's config (``kit.models.RELEASED``) with the hidden size read from the widths
of the factors, the depths from the highest block index the file reaches, and the text and
pooled-vector widths from its ``txt_in``/``vector_in`` factors; ``--model-config`` overrides
any field. Other families keep the kit's tiny config unless ``--model-config`` gives sizes.

Then the LoRA is loaded the way ComfyUI would load it: through ``comfy.sd``'s (patched)
``load_bypass_lora_for_models``, and what that load decided for each adapter is read from
the report it leaves on the patcher (:mod:`..slots`' table: factored form, transient delta
from ComfyUI's merge code, merged through ``add_patches``, or refused, with why); regular
patches go to ``add_patches`` as merged. Prediction and load are the same code, so they
cannot disagree.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .compare import LogCapture
from .loras import key_forms
from .models import RELEASED, build_model, released_config, tiny_config

# Flux-layout families: config field -> the state-dict prefix whose blocks it counts
# (as comfy.model_detection counts them), and the weights whose input width is a config field.
BLOCKS = {"depth": "double_blocks.", "depth_single_blocks": "single_blocks."}
INPUT_WIDTHS = {"context_in_dim": "txt_in.weight", "vec_in_dim": "vector_in.in_layer.weight"}
SHOWN = ("hidden_size", "depth", "depth_single_blocks", "context_in_dim", "vec_in_dim")  # printed first
PROBE_DEPTH = 64  # blocks of each kind in the probe model whose key map reads the file's depth


@dataclass
class Decision:
    """What a load did with one ``load_lora`` patch."""

    key: Any  # the load_lora key
    module: str
    where: str  # "" (whole weight), "[start:end]" (rows of a fused weight), "(fn name)"
    kind: str  # adapter type (LoRA, LoHa, ...) or the regular patch's type (diff, set)
    how: str  # "factored", "transient", "merged" (a regular patch), "refused"
    why: str = ""  # for "refused": the reason the load logged
    regular: bool = False  # a diff/set patch (add_patches), not an adapter


@dataclass
class DryRun:
    tensors: int
    patches: int
    forms: Dict[str, int]
    not_matched: int
    adapter_types: Dict[str, int]
    decisions: List[Decision] = field(default_factory=list)
    loader: str = ""  # which loader ran

    def count(self, how: str, regular: bool = False) -> int:
        return sum(1 for d in self.decisions if d.how == how and d.regular == regular)

    @property
    def modules(self) -> int:
        return len({d.module for d in self.decisions if d.how in ("factored", "transient")})

    @property
    def adapters(self) -> List[Decision]:
        return [d for d in self.decisions if not d.regular]


def model_sizes(family: str, lora: Dict[str, torch.Tensor],
                overrides: Optional[dict] = None) -> Tuple[dict, Dict[str, str]]:
    """(unet_config, {field: where its value came from}) for a model that ``lora`` fits."""
    overrides = dict(overrides or {})
    if family not in RELEASED:
        config = dict(tiny_config(family), **overrides)
        origins = {k: "--model-config" for k in overrides}
        return config, origins
    read = read_sizes(family, lora)
    sizes = dict(read, **overrides)
    origins = {k: "the LoRA file" for k in read}
    origins.update({k: "--model-config" for k in overrides})
    return released_config(family, **sizes), origins


def read_sizes(family: str, lora: Dict[str, torch.Tensor]) -> dict:
    """The sizes ``lora`` shows, read through ComfyUI's own key map on a deep probe model.

    hidden_size: the most common input width of LoRA/LoHa downs on weights whose input is the
    hidden state; depths: the highest block index matched, plus one; context_in_dim and
    vec_in_dim: the input width on ``txt_in``/``vector_in``. A size the file does not show is
    left to the released model's.
    """
    import comfy.lora
    import comfy.lora_convert

    base = RELEASED[family]
    depths = {k: PROBE_DEPTH for k in BLOCKS if k in base}
    probe = build_model(family, released_config(family, **depths)).model
    hidden = base["hidden_size"]
    shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    with LogCapture():
        loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)),
                                      comfy.lora.model_lora_keys_unet(probe, {}))
    widths: collections.Counter = collections.Counter()
    sizes: dict = {}
    for key, adapter in loaded.items():
        weight_key = key if isinstance(key, str) else key[0]
        for name, prefix in BLOCKS.items():
            m = re.match(re.escape("diffusion_model." + prefix) + r"(\d+)\.", weight_key)
            if m and name in depths:
                sizes[name] = max(sizes.get(name, 0), int(m.group(1)) + 1)
        width = _input_width(adapter)
        input_sliced = isinstance(key, tuple) and len(key) > 1 and key[1] is not None and key[1][0] != 0
        if width is None or input_sliced or len(shapes.get(weight_key, ())) != 2:
            continue
        if shapes[weight_key][1] == hidden:
            widths[width] += 1
        for name, suffix in INPUT_WIDTHS.items():
            if weight_key == "diffusion_model." + suffix and base.get(name) is not None:
                sizes[name] = width
    if widths:
        sizes["hidden_size"] = widths.most_common(1)[0][0]
    return sizes


def _input_width(adapter) -> Optional[int]:
    """The input width of a LoRA's down (or a LoHa's w1_b), None for other types."""
    weights = getattr(adapter, "weights", None) or ()
    index = {"lora": 1, "loha": 1}.get(getattr(adapter, "name", None))
    if index is None or len(weights) <= index or not isinstance(weights[index], torch.Tensor):
        return None
    return int(weights[index].shape[1]) if weights[index].dim() == 2 else None


def load_model_config(text: Optional[str]) -> dict:
    """``--model-config``: a JSON object, inline or in a file."""
    if not text:
        return {}
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            text = f.read()
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--model-config must be a JSON object of unet_config fields")
    return value


def dry_run(patcher, lora: Dict[str, torch.Tensor]) -> DryRun:
    """Load ``lora`` in bypass mode on ``patcher`` as ComfyUI would and report every decision:
    the load's own table (``loader.REPORT_ATTACHMENT``, from :mod:`..slots`), adapter by adapter.

    ``patcher`` is left as it was: the load returns a clone (its hooks are never attached).
    """
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    from comfy.weight_adapter import WeightAdapterBase

    from .. import loader
    from ..patching import is_patched

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with LogCapture() as logs:
        loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)
    if is_patched():
        load, name = comfy.sd.load_bypass_lora_for_models, "comfy.sd.load_bypass_lora_for_models (patched)"
    else:  # inert here (no bypass mode, or switched off): the plugin's loader itself
        load, name = loader.load_bypass_lora_for_models, "the plugin's loader, called directly"
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []  # its errors are reported below, once, per adapter
    try:
        with LogCapture() as load_logs:
            loaded_patcher = load(patcher, None, lora, 1.0, 0)[0]
    finally:
        root.handlers = handlers
    report = (getattr(loaded_patcher, "attachments", None) or {}).get(loader.REPORT_ATTACHMENT)
    table = report.decisions if report is not None else {}  # the load's own decisions (slots.py)
    adapters = {k: v for k, v in loaded.items() if isinstance(v, WeightAdapterBase)}
    weight_keys = set(patcher.model.state_dict())
    decisions = []
    for key, patch in loaded.items():
        module, where = _place(key)
        if key not in adapters:
            kind = patch[0] if isinstance(patch, tuple) and patch and isinstance(patch[0], str) else type(patch).__name__
            applied = (key if isinstance(key, str) else key[0]) in loaded_patcher.patches
            decisions.append(Decision(key, module, where, kind, "merged" if applied else "refused",
                                      "" if applied else "add_patches did not take it", regular=True))
            continue
        kind, decided = _adapter_kind(patch), table.get(key)
        if decided is None:
            weight_key = key if isinstance(key, str) else key[0]
            why = _reason(load_logs, key) or ("no weight %s in this model" % weight_key
                                              if weight_key not in weight_keys else "not applied (no reason logged)")
            decisions.append(Decision(key, module, where, kind, "refused", why))
        elif decided.fate == "factored" and decided.form is not None:
            decisions.append(Decision(key, module, where, decided.form.__name__.replace("Form", ""), "factored"))
        else:
            decisions.append(Decision(key, module, where, kind, decided.fate,
                                      "" if decided.fate == "factored" else decided.reason))
    return DryRun(tensors=len(lora), patches=len(loaded), forms=key_forms(loaded),
                  not_matched=logs.count("lora key not loaded"),
                  adapter_types=dict(collections.Counter(type(a).__name__ for a in adapters.values())),
                  decisions=decisions, loader=name)


def _place(key) -> Tuple[str, str]:
    """(module, where in its weight) of a load_lora key."""
    weight_key = key if isinstance(key, str) else key[0]
    module = weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key
    module = module[len("diffusion_model."):] if module.startswith("diffusion_model.") else module
    if isinstance(key, tuple) and len(key) > 2 and key[2] is not None:
        return module, "(%s)" % getattr(key[2], "__name__", "fn")
    if isinstance(key, tuple) and key[1] is not None:
        dim, start, length = key[1]
        return module, "[%d:%d]" % (start, start + length) if dim == 0 else "[dim %d %d:%d]" % (dim, start, start + length)
    return module, ""


def _adapter_kind(adapter) -> str:
    name = type(adapter).__name__
    return name[: -len("Adapter")] if name.endswith("Adapter") else name


def _reason(logs: LogCapture, key) -> str:
    """The error the load logged for ``key`` (its messages name the key or its target)."""
    from ..keys import BypassKeyError, parse_target

    needles = [repr(key)]
    try:
        needles.append(parse_target(key).describe())
    except BypassKeyError:
        pass
    for record in logs.records:
        message = record.getMessage()
        if any(n in message for n in needles) and "NOT applied" not in message:
            return message.replace("[freefuse_bypass_patch] ", "")
    return ""


def print_dry_run(name: str, family: str, run: DryRun, version: str, capabilities=None,
                  sizes: Optional[Tuple[dict, Dict[str, str]]] = None, per_module: bool = True) -> None:
    """The dry run as ``check`` prints it; ``sizes`` = model_sizes()'s answer, when it was used."""
    f = run.forms
    print("LoRA %s on a %s model (ComfyUI %s): %d tensors -> %d patches" % (name, family, version, run.tensors,
                                                                          run.patches))
    if sizes is not None:
        config, origins = sizes
        parts = []
        for origin in ("the LoRA file", "--model-config"):
            fields = sorted((k for k in config if origins.get(k) == origin), key=lambda k: (k not in SHOWN, SHOWN.index(k) if k in SHOWN else 0, k))
            if fields:
                parts.append("from %s: %s" % (origin, ", ".join("%s %s" % (k, config[k]) for k in fields)))
        base = {"flux": "Flux.1 [dev]", "chroma": "Chroma", "flux2": "FLUX.2 [klein] 4B"}.get(family)
        parts.append("other sizes as %s" % base if base else
                     "other sizes as the kit's tiny %s (not read from the file for this family)" % family)
        print("  model: %s; built on the meta device (shapes only)" % "; ".join(parts))
    print("  whole weights %d, fused slices %d, diff functions %d; tensors not matched: %d"
          % (f["whole"], f["slice"], f["function"], run.not_matched))
    print("  adapter types: %s; regular patches (diff/set, merged as stock does): %d"
          % (", ".join("%s %d" % kv for kv in sorted(run.adapter_types.items())) or "none",
             len(run.decisions) - len(run.adapters)))
    tuple_keys = sum(1 for d in run.adapters if d.where)
    functions = sum(1 for d in run.adapters if d.where.startswith("("))
    if capabilities is None or not capabilities.bypass_module:
        print("stock bypass: this ComfyUI has none (the plugin stays inert)")
    elif capabilities.native_offsets:
        print("stock bypass: applies the slices but ignores %d diff function(s)" % functions)
    else:
        print("stock bypass: drops %d adapter(s) (every fused-slice or diff-function key)" % tuple_keys)
    factored = collections.Counter(d.kind for d in run.decisions if d.how == "factored" and not d.regular)
    merged = run.count("merged")
    applied = run.count("factored") + run.count("transient") + merged
    print("plugin: applies %d of %d adapter(s) on %d module(s): %d in factored form (%s), %d as a transient delta "
          "from ComfyUI's merge code%s; refused %d"
          % (applied, len(run.adapters), run.modules, run.count("factored"),
             ", ".join("%s %d" % kv for kv in sorted(factored.items())) or "none", run.count("transient"),
             ", %d merged through add_patches" % merged if merged else "", run.count("refused")))
    if not per_module:
        return
    print("per module (%s; [rows] of a fused weight, (fn) a diff function):" % run.loader)
    by_module: Dict[str, List[Decision]] = collections.OrderedDict()
    for d in sorted(run.decisions, key=lambda d: _natural(d.module)):
        by_module.setdefault(d.module, []).append(d)
    for module, decisions in by_module.items():
        print("  %s: %s" % (module, ", ".join(("%s%s %s" % (d.kind, " " + d.where if d.where else "", d.how))
                                              for d in decisions)))
    for d in run.adapters:  # why, for every adapter that is not a factored form
        if d.how != "factored":
            print("%s %s%s: %s" % (d.how.upper(), d.module, " " + d.where if d.where else "", d.why))


def _natural(text: str):
    """Sort key with numbers compared as numbers (double_blocks.2 before double_blocks.10)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]
