"""On ComfyUI without bypass mode (0.3.75) the plugin imports, stays inert and says so once."""

import textwrap

from support import TREE, pre_bypass, run_python

SCRIPT = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import freefuse_bypass_patch as ffbp
    from freefuse_bypass_patch import kit
    kit.use_comfyui(sys.argv[1])
    import comfy.sd
    ffbp.install()  # a second install must not log again
    print("PATCHED", ffbp.is_patched(), hasattr(comfy.sd, "load_bypass_lora_for_models"))
""")


@pre_bypass
def test_inert_without_bypass_mode():
    proc = run_python(["-c", SCRIPT, TREE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PATCHED False False" in proc.stdout
    lines = [l for l in proc.stderr.splitlines() if "freefuse_bypass_patch" in l]
    assert len(lines) == 1, lines
    assert lines[0].startswith("INFO") and "no bypass mode" in lines[0] and "0.3.75" in lines[0]


def test_import_never_raises_even_if_comfy_is_broken(tmp_path):
    broken = tmp_path / "comfy"
    broken.mkdir()
    (broken / "__init__.py").write_text("")
    (broken / "sd.py").write_text("raise RuntimeError('broken ComfyUI')\n")
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import freefuse_bypass_patch
        try:
            import comfy.sd
        except RuntimeError as err:
            print("COMFY RAISED", err)
        print("ALIVE", freefuse_bypass_patch.is_patched())
    """)
    proc = run_python(["-c", script, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "COMFY RAISED broken ComfyUI" in proc.stdout and "ALIVE False" in proc.stdout
