"""FSDP2, FSDP1 and DDP on 2 CPU processes (gloo): each method's logits, loss and one-step
update equal the unsharded model's (checked inside ``distributed_worker.py``, peft LoRA as the
control), and the full adapter state dict gathered from FSDP2 reloads in a single process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from .llm import METHODS, batch, method_config, tiny_llama

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([torchrun, "--nproc_per_node", "2", str(WORKER), str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.mark.slow
def test_every_wrapper_matches_the_unsharded_model(distributed_run: Path) -> None:
    report = json.loads((distributed_run / "report.json").read_text())
    checked = {tuple(key.split("/")[:2]) for key in report}
    assert checked == {(m, w) for m in METHODS for w in ("fsdp2", "fsdp1", "ddp")}
    # every adapter tensor's update was compared, for every method and wrapper
    for method in METHODS:
        for wrapper in ("fsdp2", "fsdp1", "ddp"):
            assert any(k.startswith(f"{method}/{wrapper}/updated/") for k in report)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_gathered_adapter_reloads_in_one_process(distributed_run: Path, method: str) -> None:
    gathered = load_file(distributed_run / f"{method}-fsdp2.safetensors")
    reference = load_file(distributed_run / f"{method}-ref.safetensors")
    assert gathered.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(gathered[key], reference[key], atol=1e-6, rtol=1e-6)
    inputs = batch()
    outputs = []
    for state in (gathered, reference):
        model = get_peft_model(tiny_llama(), method_config(method)).eval()
        result = set_peft_model_state_dict(model, state)
        assert not result.unexpected_keys
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
    fresh = get_peft_model(tiny_llama(), method_config(method)).eval()
    with torch.no_grad():
        untrained = fresh(**inputs).logits
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-6)
    assert (outputs[0] - untrained).abs().max() > 1e-6, "the trained adapter was loaded"
