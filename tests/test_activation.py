"""The plugin activated explicitly and by sitecustomize; each time stock bypass must equal merged.

Each case runs tests/scenario.py in a fresh process on the tree under test: one diffusers
LoRA, three chained LoRAs (two diffusers, one kohya), strength 0, and a chain whose first
patcher must keep computing its own LoRA only. The custom-node way is in test_install.py.
"""

import os

from support import REL_TOL, bypass_era, scenario

pytestmark = bypass_era


def _assert_bypass_equals_merged(report):
    assert report["patched"], report
    for case in ("single", "chained"):
        r = report[case]
        assert r["dropped"] == 0, (case, r)
        assert r["lora_effect"] > 0.05, (case, r)  # the LoRA really changes the output
        assert r["rel_diff"] <= REL_TOL, (case, r)
        assert r["weights_unchanged"] and r["base_restored"], (case, r)
    zero = report["zero"]
    assert zero["bypass_effect"] == 0.0 and zero["base_restored"], zero
    assert report["first_after_chain"] <= REL_TOL, report
    assert report["hooks_left"] == 0, report


def test_explicit_install_uninstall_and_env_switch():
    report, _ = scenario("explicit")
    assert report["patched_when_disabled"] is False
    assert report["install_when_disabled"] is False
    assert report["install"] == [True, True]
    assert report["unpatched_after_uninstall"] and report["single_wrapper"] and report["rewrapped"]
    _assert_bypass_equals_merged(report)


def test_sitecustomize_activates_before_comfy_import(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import freefuse_bypass_patch\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    report, _ = scenario("sitecustomize", env={"PYTHONPATH": path})
    assert report["imported_before_comfy"], report
    _assert_bypass_equals_merged(report)
