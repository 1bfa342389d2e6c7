"""Trained adapters -> circuit files -> Qiskit: the operators equal the adapters' own matrices.

Quantum-PEFT: first K columns (rows 0..d-1) of the parsed QASM circuit's operator == the layer's
U and V.  QuIC: Hamming-weight-k sector == the layer's compound block C_k(A_i).  QPA: Statevector
probabilities == the generator's circuit probabilities.  From the in-memory model and from the
saved folder (identical files); manifest contents; bad input; qpeft without qiskit; the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import qpeft
from qpeft.circuits import k_subsets, qnn_probabilities
from qpeft.export import (
    add_export_circuits_parser,
    export_circuits,
    export_model_circuits,
)

pytest.importorskip("qiskit")
pytest.importorskip("qiskit_qasm3_import")

from qiskit.quantum_info import Operator, Statevector  # noqa: E402

from qpeft.export.qiskit_io import qasm3_loads, read_qpy  # noqa: E402

TOL = 1e-8
REPO = Path(__file__).resolve().parents[2]


class MLP(nn.Module):
    """Dimensions chosen to hit a power of two (16, 8) and non-powers (12, 24)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 24)
        self.mid = nn.Linear(24, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def _train(model: nn.Module, steps: int = 3) -> None:
    """A few real optimizer steps so that the angles are trained ones."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 8, generator=g)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _wrap(config) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(MLP(), config)
    _train(model)
    return model


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _load(out: Path, entry: dict):
    path = out / entry["file"]
    if path.suffix == ".qpy":
        return read_qpy(path)
    return qasm3_loads(path.read_text())


def _sector(n: int, k: int) -> list[int]:
    return [sum(1 << q for q in s) for s in k_subsets(n, k)]


def _export_both(model: nn.Module, tmp_path: Path, **kw) -> Path:
    """Export from the model and from its saved folder; the files must be identical."""
    out = export_model_circuits(model, tmp_path / "from_model")
    model.save_pretrained(tmp_path / "adapter")
    out2 = export_circuits(tmp_path / "adapter", tmp_path / "from_dir", **kw)
    m1, m2 = _manifest(out), _manifest(out2)
    assert [e["file"] for e in m1["circuits"]] == [e["file"] for e in m2["circuits"]]
    for e in m1["circuits"]:
        assert (out / e["file"]).read_text() == (out2 / e["file"]).read_text(), e["file"]
    assert m1["skipped"] == m2["skipped"]
    return out


# ------------------------------------------------------------------------------ Quantum-PEFT


@pytest.mark.parametrize("quantize_bits", [None, 3])
def test_quantum_peft_columns_equal_u_and_v(tmp_path, quantize_bits):
    config = qpeft.QuantumPEFTConfig(
        target_modules=["up", "mid", "down"], r=3, depth=2, circuit_dtype="float64",
        quantize_bits=quantize_bits,
    )
    model = _wrap(config)
    out = _export_both(model, tmp_path, base_model=MLP())
    man = _manifest(out)
    assert man["peft_type"] == "QUANTUM_PEFT" and "little-endian" in man["basis_ordering"]
    entries = {(e["module"], e["role"]): e for e in man["circuits"]}
    assert len(entries) == 12 and not man["skipped"]  # U, V and the offset start's U0, V0
    from qpeft.tuners.quantum_peft.layer import stiefel_factors

    for name, layer in model.named_modules():
        if not hasattr(layer, "qpeft_spec"):
            continue
        module = name.removeprefix("base_model.model.")
        u, v = layer.stiefel_factors("default")
        u0, v0 = stiefel_factors(layer.qpeft_spec["default"], layer.start("default")[:2])
        assert quantize_bits or not torch.allclose(u, u0)  # trained away from the start
        for role, mat in (("U", u), ("V", v), ("U0", u0), ("V0", v0)):
            e = entries[(module, role)]
            d, k = mat.shape
            assert e["dim"] == d and e["k"] == k == 3
            assert e["num_params"] == getattr(layer, f"qpeft_angles_{role[0].lower()}")["default"].numel()
            assert e["num_qubits"] == max(1, (d - 1).bit_length())
            op = Operator(_load(out, e)).data
            assert np.abs(op[:d, :k] - mat.detach().numpy()).max() < TOL, (module, role)
            assert np.allclose(op[d:, :k], 0, atol=TOL)
            assert e["depth"] == _load(out, e).depth()


def test_quantum_peft_sizes_inferred_or_clear_error(tmp_path):
    # powers of two with 'pauli' only: the angle count fixes the size
    torch.manual_seed(0)
    model = get_peft_model(
        MLP(), qpeft.QuantumPEFTConfig(target_modules=["down"], r=2, auto_generalize=False)
    )
    model.save_pretrained(tmp_path / "a")
    man = _manifest(export_circuits(tmp_path / "a", tmp_path / "o"))
    assert {(e["role"], e["dim"]) for e in man["circuits"]} == {("U", 8), ("V", 16), ("U0", 8),
                                                               ("V0", 16)}
    # 'generalized' sizes 6 and 16 both have 10 angles at L=1: without the base model, refuse
    torch.manual_seed(0)

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 6)

    model = get_peft_model(Small(), qpeft.QuantumPEFTConfig(target_modules=["lin"], r=2))
    model.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="'lin': its layer sizes cannot be read"):
        export_circuits(tmp_path / "b", tmp_path / "o2")
    man = _manifest(export_circuits(tmp_path / "b", tmp_path / "o3", base_model=Small()))
    assert {(e["role"], e["dim"]) for e in man["circuits"]} == {("U", 6), ("V", 16), ("U0", 6),
                                                               ("V0", 16)}


def test_quantum_peft_lie_parameterization_is_skipped_with_reason(tmp_path):
    model = _wrap(qpeft.QuantumPEFTConfig(target_modules=["down"], r=2, parameterization="lie_exp"))
    man = _manifest(export_model_circuits(model, tmp_path / "o"))
    assert man["circuits"] == []
    assert {s["role"] for s in man["skipped"]} == {"U", "V", "U0", "V0"}
    assert all("no compact gate form" in s["reason"] for s in man["skipped"])


# ------------------------------------------------------------------------------------- QuIC


@pytest.mark.parametrize(
    "base_map,layout,num_adapters,block_share",
    [
        ("rbs", "pyramid", 1, False),
        ("rbs", "butterfly", 2, False),
        ("rbs", "brick", 1, True),
        ("cayley", "pyramid", 1, False),
        ("exp", "pyramid", 2, False),
    ],
)
def test_quic_sectors_equal_compound_blocks(tmp_path, base_map, layout, num_adapters, block_share):
    # d_out = 24, 2 blocks of 12 rows: n = 4 (C(4,1) + C(4,2) = 10 <= 12)
    config = qpeft.QuICConfig(
        target_modules=["up"], num_blocks=2, orders=[1, 2], base_map=base_map,
        rbs_layout=layout, num_adapters=num_adapters, block_share=block_share,
        init_weights=False,
    )
    model = _wrap(config)
    out = _export_both(model, tmp_path)
    man = _manifest(out)
    layer = model.base_model.model.up
    mats = layer.block_matrices("default", dtype=torch.float64)  # per order: [N_A, C, C]
    assert len(man["circuits"]) == (1 if block_share else 2)
    for i, e in enumerate(man["circuits"]):
        assert e["role"] == ("blocks" if block_share else f"block{i}")
        assert e["n"] == e["num_qubits"] == 4
        assert e["blocks"] == ([0, 1] if block_share else [i])
        if base_map == "rbs":
            assert e["gate_counts"]["rbs"] == num_adapters * (4 if layout == "butterfly" else 6)
        op = Operator(_load(out, e)).data
        for j, k in enumerate([1, 2]):
            idx = _sector(4, k)
            got = op[np.ix_(idx, idx)]
            assert np.abs(got - mats[j][i].detach().numpy()).max() < TOL, (i, k)


def test_quic_block_rows_recorded_from_model(tmp_path):
    model = _wrap(qpeft.QuICConfig(target_modules=["up"], num_blocks=2, base_map="rbs"))
    man = _manifest(export_model_circuits(model, tmp_path / "o"))
    assert [e["block_rows"] for e in man["circuits"]] == [[[0, 12]], [[12, 24]]]
    assert man["circuits"][0]["side"] == "output: W' = Q W"


def test_quic_without_circuit_form_is_skipped(tmp_path):
    for config, why in [
        (qpeft.QuICConfig(target_modules=["up"], num_blocks=2, base_map="free"), "not orthogonal"),
        (
            qpeft.QuICConfig(
                target_modules=["up"], num_blocks=2, num_adapters=2, combine="sum",
                init_weights=False,
            ),
            "mean of unitaries",
        ),
    ]:
        model = _wrap(config)
        man = _manifest(export_model_circuits(model, tmp_path / why.replace(" ", "_")))
        assert man["circuits"] == [] and why in man["skipped"][0]["reason"]


# -------------------------------------------------------------------------------------- QPA


def test_qpa_probabilities_equal_generator(tmp_path):
    config = qpeft.QPAConfig(target_modules=["up", "mid", "down"], r=2, n_mlp=16, depth=3,
                             init_seed=1)
    model = _wrap(config)
    out = _export_both(model, tmp_path)
    man = _manifest(out)
    (e,) = man["circuits"]
    gen = model.base_model.generator("default")
    assert e["num_qubits"] == gen.n_qubits and e["depth_L"] == 3 and e["measures"]
    assert e["gate_counts"] == {"cx": 3 * (gen.n_qubits - 1), "measure": gen.n_qubits,
                                "ry": 3 * gen.n_qubits}
    qc = _load(out, e)
    assert qc.num_clbits == gen.n_qubits
    qc.remove_final_measurements()
    want = qnn_probabilities(gen.theta.detach().double()).numpy()
    assert np.abs(Statevector(qc).probabilities() - want).max() < TOL


# ------------------------------------------------------------------------------ formats, CLI


def test_qiskit_qpy_format_round_trips(tmp_path):
    config = qpeft.QuICConfig(target_modules=["up"], num_blocks=2, base_map="rbs",
                              rbs_layout="butterfly", init_weights=False)
    model = _wrap(config)
    model.save_pretrained(tmp_path / "a")
    qasm = export_circuits(tmp_path / "a", tmp_path / "q")
    qpy = export_circuits(tmp_path / "a", tmp_path / "p", format="qiskit-qpy")
    for e_q, e_p in zip(_manifest(qasm)["circuits"], _manifest(qpy)["circuits"], strict=True):
        assert e_p["file"].endswith(".qpy")
        a, b = Operator(_load(qasm, e_q)).data, Operator(_load(qpy, e_p)).data
        assert np.abs(a - b).max() < 1e-12


def test_cli_parser_runs_the_export(tmp_path, capsys):
    model = _wrap(qpeft.QPAConfig(target_modules=["up"], r=2, n_mlp=8, depth=2, init_seed=0))
    model.save_pretrained(tmp_path / "a")
    parser = argparse.ArgumentParser(prog="qpeft")
    add_export_circuits_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export-circuits", str(tmp_path / "a"), str(tmp_path / "o"),
                              "--format", "qasm3", "--max-qubits", "10"])
    assert args.func(args) == 0
    assert "qpa_generator.qnn.qasm" in capsys.readouterr().out
    assert (tmp_path / "o" / "qpa_generator.qnn.qasm").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["export-circuits", "a", "b", "--format", "quil"])


# -------------------------------------------------------------------------------- bad input


def test_lora_adapter_has_no_circuit_form(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["up"], r=2))
    with pytest.raises(ValueError, match=r"'LORA' adapter, which has no circuit form"):
        export_model_circuits(model, tmp_path / "o")
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"'LORA' adapter, which has no circuit form"):
        export_circuits(tmp_path / "lora", tmp_path / "o")


def test_too_many_qubits_is_a_clear_error(tmp_path):
    model = _wrap(qpeft.QuantumPEFTConfig(target_modules=["mid"], r=2))
    with pytest.raises(ValueError, match=r"'mid' \(U\) needs a circuit of 4 qubits, more than "
                       r"max_qubits=3"):
        export_model_circuits(model, tmp_path / "o", max_qubits=3)
    model = _wrap(qpeft.QuICConfig(target_modules=["up"], num_blocks=1, base_map="rbs"))
    with pytest.raises(ValueError, match=r"needs a circuit of 6 qubits, more than max_qubits=5"):
        export_model_circuits(model, tmp_path / "o", max_qubits=5)


def test_other_bad_input(tmp_path):
    model = _wrap(qpeft.QuICConfig(target_modules=["up"], num_blocks=2))
    with pytest.raises(ValueError, match="format must be one of"):
        export_model_circuits(model, tmp_path / "o", format="quil")
    with pytest.raises(ValueError, match="adapter_name 'other' is not an adapter"):
        export_model_circuits(model, tmp_path / "o", adapter_name="other")
    with pytest.raises(ValueError, match="max_qubits must be an integer >= 1"):
        export_model_circuits(model, tmp_path / "o", max_qubits=0)
    with pytest.raises(ValueError, match="is not a directory"):
        export_circuits(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        export_circuits(tmp_path / "empty", tmp_path / "o")


def test_qpeft_works_without_qiskit(tmp_path):
    """`import qpeft` / `qpeft.export` and the qasm3 format need no qiskit; qiskit-qpy says how
    to install it."""
    model = _wrap(qpeft.QuICConfig(target_modules=["up"], num_blocks=2, base_map="rbs"))
    model.save_pretrained(tmp_path / "a")
    code = f"""
import sys
sys.modules["qiskit"] = None  # any import of qiskit now raises ImportError
import qpeft, qpeft.export
from qpeft.export import export_circuits
out = export_circuits({str(tmp_path / 'a')!r}, {str(tmp_path / 'o')!r})
assert (out / "up.block0.qasm").read_text().startswith("//")
try:
    export_circuits({str(tmp_path / 'a')!r}, {str(tmp_path / 'p')!r}, format="qiskit-qpy")
except ImportError as err:
    assert "pip install 'qpeft[qiskit]'" in str(err), err
else:
    raise AssertionError("qiskit-qpy worked without qiskit")
assert not any(m.startswith("qiskit.") for m in sys.modules), "qiskit was imported"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_report_summarizes_an_export(tmp_path, capsys):
    from qpeft.export.report import main, summarize

    model = _wrap(qpeft.QuICConfig(target_modules=["up"], num_blocks=2, base_map="rbs",
                                   init_weights=False))
    out = export_model_circuits(model, tmp_path / "o")
    text = summarize(out, transpile=True)
    assert "QUIC, 2 circuit(s), 0 skipped" in text
    assert "2 x block: 4 qubits, depth 5, gates {'rbs': 6}; rbs expanded: depth" in text
    assert "transpiled: 12 cx" in text  # two CZ (= CX up to 1q gates) per RBS
    assert main([str(out)]) == 0 and "2 x block" in capsys.readouterr().out


def test_qpeft_command_exports_and_refuses_lora(tmp_path, capsys):
    """`qpeft export-circuits` through the real CLI: exit 0 with the files, exit 2 with one
    clear line for an adapter that has no circuit form."""
    from qpeft.cli import main

    model = _wrap(qpeft.QPAConfig(target_modules=["up"], r=2, n_mlp=8, depth=2, init_seed=0))
    model.save_pretrained(tmp_path / "a")
    assert main(["export-circuits", str(tmp_path / "a"), str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "manifest.json").is_file()
    torch.manual_seed(0)
    get_peft_model(MLP(), LoraConfig(target_modules=["up"], r=2)).save_pretrained(tmp_path / "l")
    capsys.readouterr()
    assert main(["export-circuits", str(tmp_path / "l"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qpeft: error:") and "no circuit form" in err
