"""Quantum-PEFT's published parameter counts, as qpeft computes them (rows of ``python -m
benchmarks.param_counts``)."""

from __future__ import annotations

from torch import nn

from qpeft.tuners._paper_counts import gpt2, meta_model, peft_lora_count, safe_row


def paper_count_rows() -> list[dict]:
    from qpeft.circuits.pauli import pauli_num_params
    from qpeft.tuners.quantum_peft.config import QuantumPEFTConfig

    rows: list[dict] = []
    p = "Quantum-PEFT"
    safe_row(rows, p, "Pauli angles per factor, n=12 qubits, L=2", 56, "pauli_num_params(12, 2)",
          lambda: pauli_num_params(12, 2))
    safe_row(rows, p, "Pauli angles per factor, n=10 qubits, L=2", 46, "pauli_num_params(10, 2)",
          lambda: pauli_num_params(10, 2))
    for n_dim, pub in ((1024, 64), (4096, 76)):
        safe_row(rows, p, f"adapter total, {n_dim}x{n_dim}, L=1, K=8", pub,
              "QuantumPEFTConfig(r=8, depth=1).count_module",
              lambda n_dim=n_dim: QuantumPEFTConfig(r=8, depth=1).count_module(n_dim, n_dim))
    for n_dim, r, pub in ((1024, 1, 2048), (1024, 8, 16384), (4096, 8, 65536)):
        safe_row(rows, p, f"LoRA r={r} on {n_dim}x{n_dim}", pub, "peft LoraConfig on nn.Linear",
              lambda n_dim=n_dim, r=r: peft_lora_count(
                  nn.Sequential(nn.Linear(n_dim, n_dim, bias=False, device="meta")), r, ["0"]))
    from qpeft.circuits.stiefel import stiefel_num_params

    n_dim, k = 1024, 8
    safe_row(rows, p, "Lie adapter total 2NK - K², 1024x1024, K=8 (formula)",
          2 * n_dim * k - k * k, "QuantumPEFTConfig(r=8, parameterization='lie_exp').count_module",
          lambda: QuantumPEFTConfig(r=8, parameterization="lie_exp").count_module(n_dim, n_dim),
          "2·(NK − K(K+1)/2) + K (λ) = 2NK − K²")
    safe_row(rows, p, "Lie per factor NK - K(K+1)/2, N=1024, K=8 (formula)",
          n_dim * k - k * (k + 1) // 2, "stiefel_num_params('lie_exp', 1024, 8, 1)",
          lambda: stiefel_num_params("lie_exp", n_dim, k, 1))
    safe_row(rows, p, "E2E baseline: LoRA r=4 on W_q, W_v of GPT-2 Medium", "0.35M",
          "peft LoRA r=4 on c_attn (fused q,k,v) of GPT-2 Medium = 24·4·(1024+3072)",
          lambda: peft_lora_count(meta_model(gpt2("medium")), 4, ["c_attn"]),
          "24 layers × 2 matrices × 4·(1024+1024) is also 393,216 = 0.39M; the 0.35M is the "
          "LoRA paper's own printed figure and does not follow from r=4 on W_q, W_v")
    return rows
