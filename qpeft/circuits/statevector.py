"""Exact real statevector simulation of QPA's quantum neural network (RY layers + CNOT ladders).

The circuit on ``n`` qubits with depth ``L`` acts on ``|0...0>`` as

    |psi(theta)> = prod_{l = L-1 .. 0} [ CNOT_ladder . (RY(theta[l, n-1]) x ... x RY(theta[l, 0])) ] |0...0>

i.e. each of the ``L`` layers is an RY rotation on every qubit followed by the CNOT ladder
``CNOT(0 -> 1), CNOT(1 -> 2), ..., CNOT(n-2 -> n-1)`` (applied in that order; not circular).
``RY(t) = [[cos t/2, -sin t/2], [sin t/2, cos t/2]]``. RY and CNOT are real, so amplitudes are real
and the simulation runs on real tensors (float32 or float64), differentiable in ``theta``.

Basis-index convention (the same as Qiskit, "little-endian"): qubit ``q`` is bit ``q`` of the basis
index, i.e. qubit 0 is the least significant bit. ``probabilities[..., i] = |<i|psi>|^2``.

Cost: O(L * 2**n * sum_k 2**g_k) time for qubit groups of sizes g_k <= :data:`GROUP_QUBITS`
(about the elementwise O(L * n * 2**n), in far fewer tensor ops) and O(L * 2**n * n/g) autograd
memory per circuit (each group rotation saves its input); memory is why :data:`MAX_QUBITS` caps
``n``.
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
    "GROUP_QUBITS",
    "MAX_QUBITS",
    "cnot_ladder_permutation",
    "qnn_num_params",
    "qnn_probabilities",
    "qnn_statevector",
    "qubit_groups",
]


def qnn_num_params(n_qubits: int, depth: int) -> int:
    """Number of RY angles of the QNN: ``n_qubits * depth``. O(1)."""
    check_in_range("n_qubits", n_qubits, 1, MAX_QUBITS)
    check_positive_int("depth", depth)
    return n_qubits * depth


@tensor_table_cache(maxsize=64)
def _ladder_gather_index(n_qubits: int, device: torch.device | None = None) -> torch.Tensor:
    # new[j] = old[f^{-1}(j)] where f = f_{n-2} o ... o f_0 and each f_q (CNOT q -> q+1) is an
    # involution on basis indices, so f^{-1} = f_0 o f_1 o ... o f_{n-2}: apply f_{n-2} first.
    idx = torch.arange(2**n_qubits, dtype=torch.int64)
    for q in range(n_qubits - 2, -1, -1):
        control = (idx >> q) & 1
        idx = idx ^ (control << (q + 1))
    return idx.to(device) if device is not None else idx


def cnot_ladder_permutation(n_qubits: int) -> torch.Tensor:
    """Gather index ``g`` (int64, shape [2**n]) of one CNOT ladder: ``new_state = state[..., g]``.

    The ladder is CNOT(0->1), then CNOT(1->2), ..., CNOT(n-2->n-1) with qubit q = bit q of the
    basis index. For ``n_qubits == 1`` it is the identity. O(n * 2**n) once, then cached."""
    check_in_range("n_qubits", n_qubits, 1, MAX_QUBITS)
    return _ladder_gather_index(n_qubits).clone()


#: Most qubits whose RY rotations are applied as one dense 2**g x 2**g matrix (their Kronecker
#: product). Per layer and amplitude that costs sum_k 2**g_k multiply-adds over the groups, about
#: the n elementwise RY updates' arithmetic for g <= 5, in n/g matrix products instead of ~10 n
#: small elementwise ops: a QPA layer runs the circuit in every forward, where op count dominates.
GROUP_QUBITS = 5


def qubit_groups(n_qubits: int) -> list[tuple[int, int]]:
    """``[(low qubit, size), ...]``: ``ceil(n / GROUP_QUBITS)`` runs of consecutive qubits of
    balanced sizes, most significant first, covering ``0..n-1``. O(n)."""
    count = -(-n_qubits // GROUP_QUBITS)
    sizes = [n_qubits // count + (1 if k < n_qubits % count else 0) for k in range(count)]
    groups, top = [], n_qubits
    for size in sizes:
        top -= size
        groups.append((top, size))
    return groups


def _group_rotations(cos: torch.Tensor, sin: torch.Tensor, low: int, size: int) -> torch.Tensor:
    """``RY(q=low+size-1) x ... x RY(q=low)`` for every batch element and layer: cos/sin
    [B, L, n] -> [B, L, 2**size, 2**size] (qubit ``low`` is the last Kronecker factor, the least
    significant bit of the group's index). O(B L 4**size)."""
    c, s = cos[..., low : low + size], sin[..., low : low + size]
    rot = torch.stack((c, -s, s, c), dim=-1).unflatten(-1, (2, 2))  # [B, L, size, 2, 2]
    out = rot[:, :, size - 1]
    for q in range(size - 2, -1, -1):
        d = out.shape[-1]
        factor = rot[:, :, q]
        out = (out[..., :, None, :, None] * factor[..., None, :, None, :]).reshape(
            *out.shape[:2], 2 * d, 2 * d
        )
    return out


def _apply_group(state: torch.Tensor, rotation: torch.Tensor, low: int, size: int, n: int):
    # state [B, 2**n] viewed as [B, hi, 2**size, 2**low]; rotation [B, 2**size, 2**size]
    b, k = state.shape[0], 2**size
    hi = 2 ** (n - low - size)
    if low == 0:
        return torch.bmm(state.view(b, hi, k), rotation.transpose(1, 2)).reshape(b, -1)
    if hi == 1:
        return torch.bmm(rotation, state.view(b, k, 2**low)).reshape(b, -1)
    return torch.einsum("bij,bajc->baic", rotation, state.view(b, hi, k, 2**low)).reshape(b, -1)


def qnn_statevector(theta: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Real amplitudes of the QNN state, batched over leading dims.

    ``theta``: [..., L, n] angles (float32/float64), layer ``l`` applies ``RY(theta[..., l, q])`` on
    qubit ``q`` and then the CNOT ladder. Returns [..., 2**n] amplitudes in the little-endian basis
    order (qubit 0 = least significant bit). Starts from ``|0...0>``. The RY layer acts as
    ``ceil(n / GROUP_QUBITS)`` dense rotations of groups of qubits (:func:`qubit_groups`); the
    first layer, on ``|0...0>``, as their first columns' product state. O(L * 2**n * sum_k
    2**g_k) per batch element, in about 3 L + 4 n/g tensor ops.

    ``validate=False`` skips the dtype/shape checks and the finiteness check (a reduction and,
    on an accelerator, a device sync): for callers that own a well-formed ``theta`` and run the
    circuit in every forward (QPA's generator); NaN angles then give NaN amplitudes."""
    if validate:
        check_float_dtype("theta", theta)
        if theta.dim() < 2:
            raise ValueError(
                "theta must have shape [..., L, n_qubits] (at least 2 dims), "
                f"got {tuple(theta.shape)}"
            )
    depth, n = int(theta.shape[-2]), int(theta.shape[-1])
    if validate:
        check_positive_int("theta.shape[-2] (depth L)", depth)
        check_in_range("theta.shape[-1] (n_qubits)", n, 1, MAX_QUBITS)
        check_finite("theta", theta)
    lead = theta.shape[:-2]
    flat = theta.reshape(-1, depth, n)
    batch = flat.shape[0]
    half = flat / 2
    cos, sin = torch.cos(half), torch.sin(half)
    gather = _ladder_gather_index(n, theta.device) if n > 1 else None
    groups = qubit_groups(n)
    # per group: [B, L, 2**g, 2**g] -> L tensors [B, 2**g, 2**g]
    rotations = [_group_rotations(cos, sin, low, size).unbind(1) for low, size in groups]

    # Layer 0 from |0...0>: the product of every group's first rotation column, most
    # significant group first (the row-major index has the least significant qubit last).
    state = rotations[0][0][:, :, 0]
    for per_layer in rotations[1:]:
        column = per_layer[0][:, :, 0]
        state = (state.unsqueeze(-1) * column.unsqueeze(1)).reshape(batch, -1)
    if gather is not None:
        state = state[:, gather]
    for layer in range(1, depth):
        for (low, size), per_layer in zip(groups, rotations, strict=True):
            state = _apply_group(state, per_layer[layer], low, size, n)
        if gather is not None:
            state = state[:, gather]
    return state.reshape(*lead, 2**n)


def qnn_probabilities(theta: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Measurement probabilities ``|<i|psi(theta)>|^2`` of :func:`qnn_statevector`.

    ``theta``: [..., L, n] -> [..., 2**n], summing to 1 over the last dim, little-endian basis order
    (qubit 0 = least significant bit of ``i``). Differentiable; O(L * n * 2**n) per batch element.
    ``validate``: as for :func:`qnn_statevector`."""
    amplitudes = qnn_statevector(theta, validate=validate)
    return amplitudes * amplitudes
