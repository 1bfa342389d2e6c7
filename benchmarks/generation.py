"""Benchmark 2: time to produce a Stiefel matrix U (N x K), qpeft vs a dense Kronecker reference.

qpeft: :func:`qpeft.circuits.stiefel.stiefel` ("pauli" for N a power of two, "generalized"
otherwise; falls back to :func:`qpeft.circuits.pauli.pauli_stiefel` if the dispatcher is absent)
applies the circuit to K basis columns: O(L n N K), never N x N.

Dense reference (power-of-two N only, N <= 4096): every RY sub-layer is materialised as the
N x N Kronecker product ``kron(G_{n-1}, ..., G_0)`` (qubit 0 least significant, identity on
idle qubits), every CZ sub-layer as its +-1 diagonal, and they are applied in order to
``[I_K; 0]``: O(L N^2 (K + 1)) time, O(N^2) memory. Its output is checked against qpeft's.

Timed: forward (no grad) for both; forward+backward (gradient of <U, G>) for qpeft. Median of
repeated calls after warm-up, float32, K = 8, L = 1..8.

Run alone: ``python -m benchmarks.generation [--quick]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C

NAME = "generation"
K = 8
SIZES = (256, 512, 576, 768, 1000, 1024, 2048, 3072, 4096, 8192, 10000, 16384)
DEPTHS = tuple(range(1, 9))
DENSE_MAX = 4096
QUICK_SIZES = (16, 24)
QUICK_DEPTHS = (1, 2)


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def qpeft_generator(n_dim: int, k: int, depth: int) -> tuple[str, int, Any]:
    """(method name, parameter count, fn(params) -> U) of qpeft's construction for this size."""
    method = "pauli" if _is_pow2(n_dim) else "generalized"
    try:
        from qpeft.circuits.stiefel import stiefel, stiefel_num_params
    except ImportError:
        if method != "pauli":
            raise
        from qpeft.circuits.pauli import pauli_num_params, pauli_stiefel

        nq = int(math.log2(n_dim))
        return method, pauli_num_params(nq, depth), lambda p: pauli_stiefel(p, nq, depth, k)
    return (method, stiefel_num_params(method, n_dim, k, depth),
            lambda p: stiefel(method, p, n_dim, k, depth))


def _ry(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta / 2), torch.sin(theta / 2)
    return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])


def dense_pauli_stiefel(angles: torch.Tensor, n_qubits: int, depth: int, k: int) -> torch.Tensor:
    """First k columns of the Pauli circuit, built from dense N x N Kronecker layers.

    Follows :func:`qpeft.circuits.pauli.pauli_gates` (gate order and angle indices). Time
    O((2L + 1) N^2 k), memory O(N^2)."""
    from qpeft.circuits.pauli import pauli_gates

    big_n = 1 << n_qubits
    eye2 = torch.eye(2, dtype=angles.dtype)
    idx = torch.arange(big_n)
    state = torch.eye(big_n, k, dtype=angles.dtype)
    pending_ry: dict[int, torch.Tensor] = {}

    def flush() -> None:
        nonlocal state
        if not pending_ry:
            return
        mat = torch.ones(1, 1, dtype=angles.dtype)
        for q in range(n_qubits - 1, -1, -1):  # kron(G_{n-1}, ..., G_0)
            mat = torch.kron(mat, pending_ry.get(q, eye2))
        state = mat @ state
        pending_ry.clear()

    for kind, qubits, a_idx in pauli_gates(n_qubits, depth):
        if kind == "ry":
            (q,) = qubits
            if q in pending_ry:
                flush()
            pending_ry[q] = _ry(angles[a_idx])
        else:
            flush()
            q0, q1 = qubits
            both = ((idx >> q0) & 1) & ((idx >> q1) & 1)
            state = state * (1 - 2 * both).to(angles.dtype)[:, None]
    flush()
    return state


def bench_point(n_dim: int, depth: int, quick: bool) -> dict[str, Any]:
    """qpeft forward / forward+backward and (where it fits) dense forward at one (N, L)."""
    method, p_count, fn = qpeft_generator(n_dim, K, depth)
    g = torch.Generator().manual_seed(n_dim + depth)
    params = torch.rand(p_count, generator=g) * 2 * math.pi
    grad_out = torch.randn(n_dim, K, generator=g)
    reps = 2 if quick else 7

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return fn(params)

    def fwdbwd() -> None:
        p = params.detach().requires_grad_(True)
        (fn(p) * grad_out).sum().backward()

    row: dict[str, Any] = {"N": n_dim, "L": depth, "K": K, "method": method, "params": p_count,
                           "qpeft_fwd_s": C.median_time(fwd, 1, reps),
                           "qpeft_fwdbwd_s": C.median_time(fwdbwd, 1, reps)}
    u = fwd()
    row["orthonormality_err"] = float((u.T @ u - torch.eye(K)).abs().max())
    if method == "pauli" and n_dim <= DENSE_MAX:
        nq = int(math.log2(n_dim))

        def dense() -> torch.Tensor:
            with torch.no_grad():
                return dense_pauli_stiefel(params, nq, depth, K)

        row["dense_fwd_s"] = C.median_time(dense, 0 if n_dim >= 2048 else 1,
                                           1 if quick else (2 if n_dim >= 2048 else 3))
        row["dense_over_qpeft"] = C.ratio(row["dense_fwd_s"], row["qpeft_fwd_s"])
        row["max_abs_diff_vs_dense"] = float((u - dense()).abs().max())
    return row


def plot(result: dict[str, Any], path: Path) -> None:
    """Log-log time vs N for a few depths (qpeft forward, forward+backward, dense forward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["points"] if "error" not in r]
    depths = sorted({r["L"] for r in rows})
    show = [d for d in depths if d in (1, 4, 8)] or depths
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, d in enumerate(show):
        color = f"C{i}"
        pts = sorted((r for r in rows if r["L"] == d), key=lambda r: r["N"])
        ax.loglog([r["N"] for r in pts], [r["qpeft_fwd_s"] for r in pts], "o-", color=color,
                  label=f"qpeft fwd, L={d}")
        ax.loglog([r["N"] for r in pts], [r["qpeft_fwdbwd_s"] for r in pts], "o:", color=color,
                  label=f"qpeft fwd+bwd, L={d}")
        dense = [r for r in pts if "dense_fwd_s" in r]
        if dense:
            ax.loglog([r["N"] for r in dense], [r["dense_fwd_s"] for r in dense], "s--",
                      color=color, label=f"dense Kronecker fwd, L={d}")
    ax.set_xlabel("N")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"Stiefel U (N x {K}): qpeft vs dense Kronecker reference")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, out_dir: Path = C.RESULTS_DIR) -> dict[str, Any]:
    """Every (N, L); writes ``generation.json`` / ``.md`` / ``.png``."""
    C.setup_torch()
    points = []
    for n_dim in QUICK_SIZES if quick else SIZES:
        for depth in QUICK_DEPTHS if quick else DEPTHS:
            try:
                points.append(bench_point(n_dim, depth, quick))
            except Exception as err:  # e.g. the generalized construction not landed yet
                points.append({"N": n_dim, "L": depth, "K": K,
                               "error": f"{type(err).__name__}: {err}"})
    result = {"benchmark": NAME, "quick": quick, "machine": C.machine_facts(), "K": K,
              "dtype": "float32", "points": points, "plot": "generation.png"}
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(result, out_dir / "generation.png")
    C.write_result(NAME, result, render(result), out_dir)
    return result


def render(result: dict[str, Any]) -> str:
    rows = []
    for r in result["points"]:
        if "error" in r:
            rows.append([r["N"], r["L"], "error: " + r["error"][:100]] + ["-"] * 7)
            continue
        rows.append([r["N"], r["L"], r["method"], r["params"], r["qpeft_fwd_s"] * 1e3,
                     r["qpeft_fwdbwd_s"] * 1e3,
                     r["dense_fwd_s"] * 1e3 if "dense_fwd_s" in r else None,
                     r.get("dense_over_qpeft"),
                     f"{r['max_abs_diff_vs_dense']:.1e}" if "max_abs_diff_vs_dense" in r else "-",
                     f"{r['orthonormality_err']:.1e}"])
    return C.md_table(["N", "L", "qpeft method", "params", "qpeft fwd (ms)",
                       "qpeft fwd+bwd (ms)", "dense fwd (ms)", "dense / qpeft",
                       "max |U - U_dense|", "max |UᵀU - I|"], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    a = p.parse_args(argv)
    print(render(run(a.quick, a.out)))


if __name__ == "__main__":
    main()
