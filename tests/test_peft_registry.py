"""qpeft adds its methods to peft's closed PeftType enum at import time; this must be
idempotent and must leave peft's own members alone."""

import os
import subprocess
import sys
import textwrap

import pytest
from peft.utils import PeftType

from qpeft._peft_registry import ensure_peft_type, register


def test_new_member_behaves_like_peft_members():
    member = ensure_peft_type("qpeft_registry_probe")
    assert member is PeftType.QPEFT_REGISTRY_PROBE
    assert member is PeftType("QPEFT_REGISTRY_PROBE")
    assert member == "QPEFT_REGISTRY_PROBE" and isinstance(member, str)
    assert "QPEFT_REGISTRY_PROBE" in list(PeftType)
    assert {member: 1}["QPEFT_REGISTRY_PROBE"] == 1  # peft's mappings are looked up by string


def test_ensure_is_idempotent_and_keeps_existing_members():
    assert ensure_peft_type("lora") is PeftType.LORA
    first = ensure_peft_type("qpeft_registry_probe2")
    assert ensure_peft_type("qpeft_registry_probe2") is first
    assert list(PeftType).count(first) == 1


def test_register_refuses_to_shadow_another_method():
    from peft.tuners.lora import LoraConfig, LoraModel

    class Impostor(LoraModel):
        pass

    with pytest.raises(RuntimeError, match="already has a method"):
        register("lora", LoraConfig, Impostor, prefix="lora_")


_PEFT_VERSIONS = ["0.18.1", "0.20.0"]


@pytest.mark.slow
@pytest.mark.parametrize("version", _PEFT_VERSIONS)
def test_methods_register_on_older_peft(version, tmp_path):
    """Install an older peft (pure Python) into a side folder and run get_peft_model / save /
    load for each qpeft method with it first on the path."""
    target = tmp_path / f"peft-{version}"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         f"peft=={version}"], capture_output=True, text=True, timeout=600,
    )
    if pip.returncode != 0:
        pytest.skip(f"could not install peft=={version}: {pip.stderr[-300:]}")
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(target)!r})
        import peft, torch, qpeft
        assert peft.__version__ == {version!r}, peft.__version__
        from peft import get_peft_model, PeftModel
        from tests.contract.harness import build_tiny, run
        for cfg in qpeft.example_configs(["lin0", "lin1"]):
            model = get_peft_model(build_tiny("mlp"), cfg)
            model.save_pretrained({str(tmp_path)!r} + "/" + type(cfg).__name__)
            loaded = PeftModel.from_pretrained(build_tiny("mlp"), {str(tmp_path)!r} + "/" + type(cfg).__name__)
            assert torch.equal(run(model, "mlp"), run(loaded, "mlp"))
            print(type(cfg).__name__, "ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=os.getcwd(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
