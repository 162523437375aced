"""The plugin activated explicitly and by sitecustomize; each time stock bypass must equal merged.

Each case runs tests/scenario.py in a fresh process on the tree under test: one diffusers
LoRA, three chained LoRAs (two diffusers, one kohya), strength 0, and a chain whose first
patcher must keep computing its own LoRA only. The custom-node way is in test_install.py.
"""

import os

from support import assert_bypass_equals_merged, bypass_era, scenario

pytestmark = bypass_era


def test_explicit_install_uninstall_and_env_switch():
    report, _ = scenario("explicit")
    assert report["patched_when_disabled"] is False
    assert report["install_when_disabled"] is False
    assert report["install"] == [True, True]
    assert report["unpatched_after_uninstall"] and report["single_wrapper"] and report["rewrapped"]
    assert_bypass_equals_merged(report)


def test_sitecustomize_activates_before_comfy_import(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import freefuse_bypass_patch\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    report, _ = scenario("sitecustomize", env={"PYTHONPATH": path})
    assert report["imported_before_comfy"], report
    assert_bypass_equals_merged(report)
