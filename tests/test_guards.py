"""Capability guards on the real tree: unknown signatures keep the plugin inert; the 0.14.1
fork's own offsets/stacking are detected and never applied on top of ours."""

import logging

import comfy.sd
import pytest

import freefuse_bypass_patch as ffbp
from freefuse_bypass_patch import patching
from support import bypass_era

pytestmark = bypass_era


@pytest.fixture
def reinstall():
    yield
    ffbp.uninstall()
    ffbp.install()
    assert ffbp.is_patched()


def test_unknown_loader_signature_stays_inert(monkeypatch, caplog, reinstall):
    ffbp.uninstall()

    def load_bypass_lora_for_models(model, lora, strength):  # a future, different API
        return model

    monkeypatch.setattr(comfy.sd, "load_bypass_lora_for_models", load_bypass_lora_for_models)
    with caplog.at_level(logging.INFO):
        assert ffbp.install() is True
    assert comfy.sd.load_bypass_lora_for_models is load_bypass_lora_for_models  # untouched
    warnings = [r for r in caplog.records if "freefuse_bypass_patch" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "load_bypass_lora_for_models" in warnings[0].getMessage() and "inert" in warnings[0].getMessage()
    monkeypatch.undo()


def test_missing_manager_method_stays_inert(monkeypatch, caplog, reinstall):
    import comfy.weight_adapter.bypass as bypass

    ffbp.uninstall()
    monkeypatch.delattr(bypass.BypassInjectionManager, "create_injections")
    with caplog.at_level(logging.INFO):
        ffbp.install()
    assert not ffbp.is_patched()
    assert any("BypassInjectionManager" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    monkeypatch.undo()


def test_capabilities_of_this_tree():
    caps = ffbp.capabilities()
    assert caps is not None and caps.patchable
    fork = caps.comfyui_version == "0.14.1"  # berryber09's fork carries its own partial fix
    assert caps.native_offsets is fork and caps.native_stacking is fork and caps.native_chaining is fork


def test_install_is_idempotent():
    wrapper = comfy.sd.load_bypass_lora_for_models
    ffbp.install()
    ffbp.install()
    assert comfy.sd.load_bypass_lora_for_models is wrapper
    assert not getattr(wrapper.__wrapped__, patching.MARK, False)  # never a wrapper of a wrapper
