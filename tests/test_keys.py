"""The three load_lora key forms, reduced to Target (no ComfyUI needed beyond import)."""

import pytest

from freefuse_bypass_patch.keys import BypassKeyError, Target, parse_target


def test_plain_key():
    t = parse_target("diffusion_model.img_in.weight")
    assert t == Target("diffusion_model.img_in.weight")
    assert t.module_path == "diffusion_model.img_in"


def test_slice_key():
    t = parse_target(("diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, 3072, 3072)))
    assert t.offset == (0, 3072, 3072) and t.function is None
    assert t.module_path == "diffusion_model.double_blocks.0.img_attn.qkv"


def test_function_key():
    def swap_scale_shift(x):
        return x

    t = parse_target(("diffusion_model.final_layer.adaLN_modulation.1.weight", None, swap_scale_shift))
    assert t.offset is None and t.function is swap_scale_shift
    assert "swap_scale_shift" in t.describe()


def test_offset_argument_as_the_fork_passes_it():
    assert parse_target("a.weight", offset=(0, 2, 3)).offset == (0, 2, 3)


@pytest.mark.parametrize("bad", [
    ("a.weight", (0, 0, 0)),        # empty slice
    ("a.weight", (0, -1, 4)),       # negative start
    ("a.weight", (0, 1)),           # not (dim, start, length)
    ("a.weight", None, "notfn"),    # function not callable
    (1, (0, 0, 1)),                 # not a weight name
    42,
])
def test_malformed_keys_name_the_key(bad):
    with pytest.raises(BypassKeyError) as err:
        parse_target(bad)
    assert repr(bad) in str(err.value)


def test_conflicting_offsets():
    with pytest.raises(BypassKeyError, match="offset given twice"):
        parse_target(("a.weight", (0, 0, 4)), offset=(0, 4, 4))
