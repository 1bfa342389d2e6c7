"""Exact real statevector simulation of QPA's quantum neural network (RY layers + CNOT ladders).

The circuit on ``n`` qubits with depth ``L`` acts on ``|0...0>`` as

    |psi(theta)> = prod_{l = L-1 .. 0} [ CNOT_ladder . (RY(theta[l, n-1]) x ... x RY(theta[l, 0])) ] |0...0>

i.e. each of the ``L`` layers is an RY rotation on every qubit followed by the CNOT ladder
``CNOT(0 -> 1), CNOT(1 -> 2), ..., CNOT(n-2 -> n-1)`` (applied in that order; not circular).
``RY(t) = [[cos t/2, -sin t/2], [sin t/2, cos t/2]]``. RY and CNOT are real, so amplitudes are real
and the simulation runs on real tensors (float32 or float64), differentiable in ``theta``.

Basis-index convention (the same as Qiskit, "little-endian"): qubit ``q`` is bit ``q`` of the basis
index, i.e. qubit 0 is the least significant bit. ``probabilities[..., i] = |<i|psi>|^2``.

Cost: O(L * n * 2**n) time and O(L * n * 2**n) autograd memory per circuit (each RY saves its input);
memory is why :data:`MAX_QUBITS` caps ``n``.
"""

from __future__ import annotations

import torch

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._checks import (
    check_finite,
    check_float_dtype,
    check_in_range,
    check_positive_int,
)

#: Largest register simulated: 2**24 amplitudes are 64 MiB in float32 per circuit and per saved
#: autograd tensor (L*n of them in training). Larger registers raise ValueError.
MAX_QUBITS = 24

__all__ = [
    "MAX_QUBITS",
    "cnot_ladder_permutation",
    "qnn_num_params",
    "qnn_probabilities",
    "qnn_statevector",
]


def qnn_num_params(n_qubits: int, depth: int) -> int:
    """Number of RY angles of the QNN: ``n_qubits * depth``. O(1)."""
    check_in_range("n_qubits", n_qubits, 1, MAX_QUBITS)
    check_positive_int("depth", depth)
    return n_qubits * depth


@tensor_table_cache(maxsize=64)
def _ladder_gather_index(n_qubits: int) -> torch.Tensor:
    # new[j] = old[f^{-1}(j)] where f = f_{n-2} o ... o f_0 and each f_q (CNOT q -> q+1) is an
    # involution on basis indices, so f^{-1} = f_0 o f_1 o ... o f_{n-2}: apply f_{n-2} first.
    idx = torch.arange(2**n_qubits, dtype=torch.int64)
    for q in range(n_qubits - 2, -1, -1):
        control = (idx >> q) & 1
        idx = idx ^ (control << (q + 1))
    return idx


def cnot_ladder_permutation(n_qubits: int) -> torch.Tensor:
    """Gather index ``g`` (int64, shape [2**n]) of one CNOT ladder: ``new_state = state[..., g]``.

    The ladder is CNOT(0->1), then CNOT(1->2), ..., CNOT(n-2->n-1) with qubit q = bit q of the
    basis index. For ``n_qubits == 1`` it is the identity. O(n * 2**n) once, then cached."""
    check_in_range("n_qubits", n_qubits, 1, MAX_QUBITS)
    return _ladder_gather_index(n_qubits).clone()


def _apply_ry(state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: int, n: int):
    # state: [B, 2**n]; cos/sin: [B]. View as [B, hi, 2, lo] with lo = 2**q (bit q is the middle axis).
    b = state.shape[0]
    view = state.reshape(b, 2 ** (n - 1 - q), 2, 2**q)
    s0, s1 = view[:, :, 0, :], view[:, :, 1, :]
    c = cos.view(b, 1, 1)
    s = sin.view(b, 1, 1)
    return torch.stack((c * s0 - s * s1, s * s0 + c * s1), dim=2).reshape(b, 2**n)


def qnn_statevector(theta: torch.Tensor) -> torch.Tensor:
    """Real amplitudes of the QNN state, batched over leading dims.

    ``theta``: [..., L, n] angles (float32/float64), layer ``l`` applies ``RY(theta[..., l, q])`` on
    qubit ``q`` and then the CNOT ladder. Returns [..., 2**n] amplitudes in the little-endian basis
    order (qubit 0 = least significant bit). Starts from ``|0...0>``; the first RY layer is applied
    as a product state. O(L * n * 2**n) per batch element."""
    check_float_dtype("theta", theta)
    if theta.dim() < 2:
        raise ValueError(
            f"theta must have shape [..., L, n_qubits] (at least 2 dims), got {tuple(theta.shape)}"
        )
    depth, n = int(theta.shape[-2]), int(theta.shape[-1])
    check_positive_int("theta.shape[-2] (depth L)", depth)
    check_in_range("theta.shape[-1] (n_qubits)", n, 1, MAX_QUBITS)
    check_finite("theta", theta)
    lead = theta.shape[:-2]
    flat = theta.reshape(-1, depth, n)
    batch = flat.shape[0]
    half = flat / 2
    cos, sin = torch.cos(half), torch.sin(half)
    gather = _ladder_gather_index(n).to(theta.device)

    # Layer 0 from |0...0>: the RY layer gives the product state x_q (cos_q, sin_q); qubit 0 is the
    # last (fastest) axis of the row-major index.
    state = torch.ones(batch, 1, dtype=theta.dtype, device=theta.device)
    for q in range(n - 1, -1, -1):
        pair = torch.stack((cos[:, 0, q], sin[:, 0, q]), dim=-1)  # [B, 2]
        state = (state.unsqueeze(-1) * pair.unsqueeze(1)).reshape(batch, -1)
    if n > 1:
        state = state[:, gather]
    for layer in range(1, depth):
        for q in range(n):
            state = _apply_ry(state, cos[:, layer, q], sin[:, layer, q], q, n)
        if n > 1:
            state = state[:, gather]
    return state.reshape(*lead, 2**n)


def qnn_probabilities(theta: torch.Tensor) -> torch.Tensor:
    """Measurement probabilities ``|<i|psi(theta)>|^2`` of :func:`qnn_statevector`.

    ``theta``: [..., L, n] -> [..., 2**n], summing to 1 over the last dim, little-endian basis order
    (qubit 0 = least significant bit of ``i``). Differentiable; O(L * n * 2**n) per batch element."""
    amplitudes = qnn_statevector(theta)
    return amplitudes * amplitudes
