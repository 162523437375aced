"""``check --masks`` run as a user would: the PNG shows each LoRA on its own half, and the numbers say so."""

import re

import pytest

from PIL import Image

from freefuse_bypass_patch.kit import maskview
from support import TREE, bypass_era, pre_bypass, run_python

ROW = r"^%s\s+%s\s+(\S+)\s+(\S+)\s+(\S+)$"


def _token_colours(image, panel):
    """{(row, col): (r, g, b)} at the centre of each token square of ``panel``."""
    x0, y0 = maskview.panel_origin(panel)
    half = maskview.CELL // 2
    return {(r, c): image.getpixel((x0 + c * maskview.CELL + half, y0 + r * maskview.CELL + half))
            for r in range(maskview.GRID) for c in range(maskview.GRID)}


@bypass_era
@pytest.mark.parametrize("model", maskview.MODELS)
def test_check_masks_draws_each_lora_on_its_half(tmp_path, model):
    path = tmp_path / "masks.png"
    proc = run_python(["-m", "freefuse_bypass_patch", "check", "--masks", "--model", model, "--out", str(path),
                       "--comfyui", TREE])
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "RESULT: each LoRA acts only inside its mask" in out and "wrote %s" % path in out

    for name in maskview.NAMES:
        modules = re.search(ROW % ("in the modules", name), out, re.M)
        output = re.search(ROW % ("model output", name), out, re.M)
        assert modules and output, out
        inside, outside, _ = map(float, modules.groups())
        assert inside > 0 and outside == 0, modules.group(0)
        inside, outside, ratio = map(float, output.groups())
        assert inside > outside > 0 and ratio < 1, output.group(0)  # attention leaks some, not most
    text = re.search(r"^text tokens: .*: (\S+)", out, re.M)
    assert text and float(text.group(1)) == 0, out

    image = Image.open(path).convert("RGB")
    assert image.size == maskview.SIZE
    left_cols = range(maskview.GRID // 2)
    modules = _token_colours(image, 0)
    for (r, c), (red, _, blue) in modules.items():
        assert (red > blue) if c in left_cols else (blue > red), ((r, c), (red, blue))
    if model != "flux":
        return  # the UNet's convs and Z-Image's attention spread the output more: the numbers above say how much
    output = _token_colours(image, 1)
    for half, dominant in ((True, 0), (False, 2)):
        pixels = [rgb for (r, c), rgb in output.items() if (c in left_cols) == half]
        mean = [sum(p[i] for p in pixels) / len(pixels) for i in range(3)]
        assert mean[dominant] > 1.5 * mean[2 - dominant], (half, mean)


@pre_bypass
def test_check_masks_needs_bypass_mode(tmp_path):
    path = tmp_path / "masks.png"
    proc = run_python(["-m", "freefuse_bypass_patch", "check", "--masks", "--out", str(path), "--comfyui", TREE])
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "token masks need ComfyUI's bypass mode" in proc.stdout and not path.exists()
