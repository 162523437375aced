"""The README's first command, run as a user would, on the tree under test."""

import os
import re

import comfy.sd  # noqa: F401  (the plugin decides what this tree can do on this import)
import pytest

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import kit as sc
from support import HAS_BYPASS, ROOT, TREE, run_python


def test_check_shows_stock_vs_patched():
    proc = run_python(["-m", "freefuse_bypass_patch", "check", "--comfyui", TREE])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if HAS_BYPASS:
        assert "RESULT: bypass == merged" in proc.stdout
        patched = re.search(r"^patched\s+(\d+)\s+(\S+)", proc.stdout, re.M)
        assert patched and int(patched.group(1)) == 0 and float(patched.group(2)) <= 1e-5, proc.stdout
    else:
        assert "RESULT: hook == merged" in proc.stdout and "stays inert" in proc.stdout


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dry_run_of_a_lora_file(family, tmp_path):
    if not sc.available(family):
        pytest.skip("this ComfyUI cannot build %s" % family)
    lora = sc.family_lora(sc.tiny_model(family).model, family, rank=2)
    path = sc.save_lora(lora, str(tmp_path / "my_lora.safetensors"))
    proc = run_python(["-m", "freefuse_bypass_patch", "check", "--comfyui", TREE, "--lora", path, "--model", family])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "LoRA my_lora.safetensors on a %s key map" % family in out
    forms = re.search(r"whole weights (\d+), fused slices (\d+), diff functions (\d+); tensors not matched: (\d+)", out)
    assert forms, out
    whole, sliced, funcs, unmatched = map(int, forms.groups())
    assert sliced > 0 and unmatched == 0 and whole + sliced + funcs == len(lora) // 2
    applied = re.search(r"plugin: applies (\d+) adapter", out)
    assert applied and int(applied.group(1)) == len(lora) // 2
    if HAS_BYPASS:
        native = ffbp.capabilities().native_offsets  # the 0.14.1 fork applies slices itself
        expected = ("applies the slices but ignores %d diff function" % funcs if native
                    else "drops %d adapter" % (sliced + funcs))
        assert "stock bypass: " + expected in out, out


def test_benchmark_runs_as_documented():
    """The README's benchmark command runs on a bare environment (no torchvision on the path)
    and prints its table, the masked rows with their ratio and the forward-hook traffic floor,
    for Flux, SDXL and Z-Image in one process. One short round: no timing is asserted."""
    if not HAS_BYPASS:
        pytest.skip("the benchmark compares bypass modes; this ComfyUI has none")
    script = os.path.join(ROOT, "benchmarks", "bypass_overhead.py")
    proc = run_python([script, "--comfyui", TREE, "--rounds", "1", "--iters", "1", "--modes", "plugin,naive",
                       "--masks", "--model", "flux,sdxl,zimage"],
                      env={"PYTHONPATH": ""})
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for mode in ("merged, 1 LoRA", "plugin, 1 LoRA", "plugin, 3 LoRAs", "naive hook, 3 LoRAs", "merged, 2 LoRAs",
                 "plugin, 2 LoRAs, masked", "naive masked hook, 2 LoRAs"):
        assert re.search(r"^%s(\s+\d+\.\d+){5}" % re.escape(mode), out, re.M), out
    assert not re.search(r"^stock bypass, kohya\s+\d", out, re.M), out  # --modes filtered its row out
    for model in ("flux", "sdxl", "zimage"):
        assert re.search(r"^masked / merged with 2 LoRAs \(%s\): \d+\.\d+x \(target <= 1\.12x: (PASS|MISS)\); "
                         r"fastest forwards: \d+\.\d+x$" % model, out, re.M), out
    assert re.search(r"^masked / merged with 2 LoRAs \(target <= 1\.12x\), median \(fastest forwards\): "
                     r"flux [\d.]+x \([\d.]+x\), sdxl [\d.]+x \([\d.]+x\), zimage [\d.]+x \([\d.]+x\)$", out, re.M), out
    floors = re.findall(r"traffic floor \(1 LoRA\): (\d+\.\d+) GB per forward", out)
    assert len(floors) == 3 and all(float(f) > 0 for f in floors), out
