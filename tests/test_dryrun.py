"""``check --lora`` on a LoRA of real Flux.1 width: the dry run must say what a real load does.

The LoRA files are made here at hidden size 3072, rank 2, in diffusers names (fused slices,
a diff function) and kohya names (whole fused weights), for a Flux of 2 double and 3 single
blocks. The reference is a load in this process on a model of that width built on the meta
device (every module and shape, no weights): ComfyUI's bypass loader (patched), then the
injection it sets, run as ``patch_model`` runs it; what the hooks hold is what was decided.
"""

import os
import re

import comfy.sd  # noqa: F401  (the plugin decides what this tree can do on this import)
import pytest

from freefuse_bypass_patch import kit, loader
from freefuse_bypass_patch.hooks import ACTIVE_HOOK_ATTR
from freefuse_bypass_patch.kit.trees import tree_version
from support import HAS_BYPASS, ROOT, TREE, run_python

SIZES = dict(hidden_size=3072, depth=2, depth_single_blocks=3)
README_VERSION = "0.28.0"  # the README shows this dry run on this tree


def _readme_lines(after):
    """The lines of the code block after the line that ends with ``after`` in README.md, "..." left out."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text.split(after, 1)[1].split("```", 2)[1].split("\n", 1)[1]
    return [line for line in block.rstrip("\n").splitlines() if line.strip() != "..."]


def _shown_in_readme(out, after):
    if tree_version(TREE) == README_VERSION:
        lines = out.splitlines()
        assert [line for line in _readme_lines(after) if line not in lines] == [], out


def _real_model(**sizes):
    return kit.build_model("flux", kit.flux_config(**dict(SIZES, **sizes)))


def _where(target):
    if target.function is not None:
        return " (%s)" % target.function.__name__
    if target.offset is not None:
        return " [%d:%d]" % (target.offset[1], target.offset[1] + target.offset[2])
    return ""


def _real_load(patcher, lora):
    """{(module, where, form, how)} as a real bypass load decides them."""
    load = comfy.sd.load_bypass_lora_for_models if HAS_BYPASS else loader.load_bypass_lora_for_models
    loaded = load(patcher, None, lora, 1.0, 0)[0]
    injections = loaded.injections.get(loader.INJECTION_KEY, [])
    for injection in injections:
        injection.inject(loaded)
    try:
        hooks = [m.__dict__[ACTIVE_HOOK_ATTR] for m in patcher.model.modules() if ACTIVE_HOOK_ATTR in m.__dict__]
        decided = set()
        for hook in hooks:
            module = hook.module_path.replace("diffusion_model.", "", 1)
            for slot, cls in hook.form_slots:
                decided.add((module, _where(slot.target), cls.__name__[:-len("Form")], "factored"))
            for group in hook.transient_groups:
                decided |= {(module, _where(s.target), "LoRA", "transient") for s in group.slots}
        return decided
    finally:
        for injection in injections:
            injection.eject(loaded)


def _printed(out):
    """{(module, where, form, how)} from check's per-module lines."""
    section = out.split("per module (", 1)[1].split("\n", 1)[1]
    printed = set()
    for line in section.splitlines():
        m = re.match(r"^  (\S+): (.*)$", line)
        if not m:
            continue
        for entry in m.group(2).split(", "):
            e = re.fullmatch(r"(\w+)( \[\d+:\d+\]| \(\w+\))? (factored|transient|refused)", entry)
            assert e, line
            printed.add((m.group(1), e.group(2) or "", e.group(1), e.group(3)))
    return printed


def _check(path, *extra):
    proc = run_python(["-m", "freefuse_bypass_patch", "check", "--comfyui", TREE, "--lora", path] + list(extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("convention", ["diffusers", "kohya"])
def test_dry_run_of_a_real_width_flux_lora_is_what_a_load_does(convention, tmp_path):
    model = _real_model()
    lora = (kit.family_lora(model.model, "flux", rank=2) if convention == "diffusers"
            else kit.make_lora(model.model, "kohya", rank=2))
    assert max(t.shape[-1] for t in lora.values()) >= 3072  # real width, rank 2
    path = kit.save_lora(lora, str(tmp_path / ("flux_%s.safetensors" % convention)))
    out = _check(path)

    assert ("model: from the LoRA file: hidden_size 3072, depth 2, depth_single_blocks 3, context_in_dim 4096, "
            "vec_in_dim 768; other sizes as Flux.1 [dev]") in out, out
    adapters = len(lora) // 2
    summary = re.search(r"^plugin: applies (\d+) of (\d+) adapter\(s\) on (\d+) module.*; refused (\d+)$", out, re.M)
    assert summary and [int(summary.group(i)) for i in (1, 2, 4)] == [adapters, adapters, 0], out
    assert "does not fit" not in out and "REFUSED" not in out
    expected = _real_load(_real_model(), kit.load_lora_file(path))
    assert len(expected) == adapters  # every adapter is in a hook, each once
    assert _printed(out) == expected
    if convention == "diffusers":  # the slices are named: q, k, v of a fused qkv, and linear1's mlp part
        _shown_in_readme(out, "checks these lines on %s):" % README_VERSION)
        assert re.search(r"^  double_blocks\.1\.img_attn\.qkv: LoRA \[0:3072\] factored, LoRA \[3072:6144\] factored, "
                         r"LoRA \[6144:9216\] factored$", out, re.M), out
        assert re.search(r"^  single_blocks\.2\.linear1: .*LoRA \[9216:21504\] factored$", out, re.M), out
        assert "final_layer.adaLN_modulation.1: LoRA (swap_scale_shift) factored" in out  # a row permutation: factors only


def test_model_config_overrides_and_refusals_name_the_reason(tmp_path):
    """A width that does not fit the file: every adapter refused, each with the shapes, as a load on
    such a model refuses them."""
    lora = kit.family_lora(_real_model().model, "flux", rank=2)
    path = kit.save_lora(lora, str(tmp_path / "flux_diffusers.safetensors"))
    out = _check(path, "--model-config", '{"hidden_size": 1536}')
    assert "from --model-config: hidden_size 1536" in out, out
    adapters = len(lora) // 2
    summary = re.search(r"^plugin: applies (\d+) of (\d+) adapter\(s\).*; refused (\d+)$", out, re.M)
    assert summary and list(map(int, summary.groups())) == [0, adapters, adapters], out
    refused = re.findall(r"^REFUSED (\S+)( \[\d+:\d+\]| \(\w+\))?: (?=.*(?:does not fit|cannot apply)).*weight \((\d+), (\d+)\)\)",
                         out, re.M)
    assert len(refused) == adapters, out
    assert ("double_blocks.0.img_attn.qkv", " [0:1536]", "4608", "1536") in refused
    assert _real_load(_real_model(hidden_size=1536), kit.load_lora_file(path)) == set()
    _shown_in_readme(out, "each with the shapes:")
