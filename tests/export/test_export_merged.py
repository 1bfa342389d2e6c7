"""``qpeft export-merged``: any method (QuIC, multiplicative, included) folded into its base and
saved as a plain transformers folder that loads, without qpeft, to the adapter's outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from qpeft.train.methods import build_peft_config
from tests.cli import tiny


def test_a_quic_adapter_merges_into_a_model_transformers_loads_alone(tmp_path, capsys):
    from qpeft.cli import main

    base_dir = tiny.save_tiny_llama(tmp_path / "base")
    config = build_peft_config("quic", ["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config.init_weights = False  # a rotation that is not the identity
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).eval()
    model.save_pretrained(tmp_path / "quic")
    saved = json.loads((tmp_path / "quic" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir)
    ids = torch.tensor([[2, 9, 10, 11, 12]])
    with torch.no_grad():
        expected = model(ids).logits
        with model.disable_adapter():
            assert not torch.allclose(expected, model(ids).logits)  # a non-trivial rotation
    assert main(["export-merged", str(tmp_path / "quic"), str(tmp_path / "merged")]) == 0
    script = f"""
import sys, torch
sys.modules["qpeft"] = None
sys.modules["peft"] = None  # a plain transformers model: no adapter library at all
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}).eval()
with torch.no_grad():
    torch.save(model(torch.tensor([[2, 9, 10, 11, 12]])).logits, {str(tmp_path / "out.pt")!r})
"""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_without_a_base_model_it_says_so_in_one_line(tmp_path, capsys):
    from qpeft.cli import main

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "QUIC", "task_type": "CAUSAL_LM", "base_model_name_or_path": None}))
    assert main(["export-merged", str(tmp_path / "a"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--base-model" in err and len(err.splitlines()) == 1


def test_merged_equals_peft_merge(tmp_path):
    """The folder holds exactly what PeftModel.merge_and_unload gives (QPA, additive)."""
    from qpeft.export.merged import export_merged

    base_dir = tiny.save_tiny_llama(tmp_path / "base")
    config = build_peft_config("qpa", ["q_proj"], task_type="CAUSAL_LM",
                               options={"rank": 2, "n_mlp": 32})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        model.base_model.generator().gain.fill_(0.5)
    model.save_pretrained(tmp_path / "qpa")
    export_merged(tmp_path / "qpa", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                          tmp_path / "qpa").merge_and_unload()
    for (name, a), (_, b) in zip(merged.state_dict().items(), reference.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
