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
from qpeft.circuits._precision import without_autocast
from qpeft.circuits.ry_groups import group_rotations, group_rotations_half_angle_grad

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


@tensor_table_cache(maxsize=64)
def _ladder_inverse_index(n_qubits: int, device: torch.device | None = None) -> torch.Tensor:
    # the inverse permutation of _ladder_gather_index: undoes one ladder (the backward's gather)
    return torch.argsort(_ladder_gather_index(n_qubits, device))


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


def _apply_group(state: torch.Tensor, rotation: torch.Tensor, low: int, size: int, n: int,
                 transpose: bool = False) -> torch.Tensor:
    """``rotation`` (or its transpose) on the qubits ``low..low+size-1`` of ``state`` [B, 2**n]
    (viewed as [B, hi, 2**size, 2**low]); rotation [B, 2**size, 2**size]. One bmm/einsum."""
    b, k = state.shape[0], 2**size
    hi = 2 ** (n - low - size)
    if transpose:
        rotation = rotation.transpose(1, 2)
    if low == 0:
        return torch.bmm(state.view(b, hi, k), rotation.transpose(1, 2)).reshape(b, -1)
    if hi == 1:
        return torch.bmm(rotation, state.view(b, k, 2**low)).reshape(b, -1)
    return torch.einsum("bij,bajc->baic", rotation, state.view(b, hi, k, 2**low)).reshape(b, -1)


def _group_rotation_grad(grad: torch.Tensor, state: torch.Tensor, low: int, size: int,
                         n: int) -> torch.Tensor:
    """d loss / d rotation [B, 2**size, 2**size] of :func:`_apply_group` from the gradient of
    its output and its input ``state`` (both [B, 2**n]): ``sum_{a,c} grad[a,i,c] state[a,j,c]``."""
    b, k = state.shape[0], 2**size
    hi = 2 ** (n - low - size)
    if low == 0:
        return torch.bmm(grad.view(b, hi, k).transpose(1, 2), state.view(b, hi, k))
    if hi == 1:
        return torch.bmm(grad.view(b, k, 2**low), state.view(b, k, 2**low).transpose(1, 2))
    shape = (b, hi, k, 2**low)
    return torch.einsum("baic,bajc->bij", grad.view(shape), state.view(shape))


class _Circuit(torch.autograd.Function):
    """theta [B, L, n] -> amplitudes [B, 2**n] as one autograd node (the circuit runs in every
    QPA layer's forward and backward, where per-op autograd overhead dominated).

    Forward: each qubit group's rotation for every layer at once
    (:func:`qpeft.circuits.ry_groups.group_rotations`, a gather and a product); per layer each
    group's rotation as one bmm/einsum, then the ladder gather; the input of every group step is
    saved. Backward: the layers in reverse, per group step the rotation's gradient and the
    transposed rotation (two bmm/einsum), per layer the inverse gather; then the angles'
    gradients from the rotations' (``ry_groups.group_rotations_half_angle_grad``: one batched
    matmul and a gather per group). First-order only."""

    @staticmethod
    def forward(ctx, theta, groups, gather, inverse):  # type: ignore[override]
        batch, depth, n = theta.shape
        half = theta / 2
        cos, sin = torch.cos(half), torch.sin(half)
        rotations = [  # [B, L, 2**size, 2**size] per group
            group_rotations(cos[..., low : low + size], sin[..., low : low + size])
            for low, size in groups
        ]
        per_layer = [rotation.unbind(1) for rotation in rotations]
        state = torch.zeros(batch, 2**n, dtype=theta.dtype, device=theta.device)
        state[:, 0] = 1
        saved = []
        for layer in range(depth):
            for (low, size), rotation in zip(groups, per_layer, strict=True):
                saved.append(state)
                state = _apply_group(state, rotation[layer], low, size, n)
            if gather is not None:
                state = state.index_select(1, gather)
        ctx.groups, ctx.inverse, ctx.depth = groups, inverse, depth
        ctx.save_for_backward(*rotations, *saved)
        return state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        groups, inverse, depth = ctx.groups, ctx.inverse, ctx.depth
        n = sum(size for _, size in groups)
        tensors = ctx.saved_tensors
        rotations, saved = tensors[: len(groups)], tensors[len(groups) :]
        per_layer = [rotation.unbind(1) for rotation in rotations]
        grads: list[list[torch.Tensor]] = [[] for _ in groups]
        position = len(saved)
        for layer in range(depth - 1, -1, -1):
            if inverse is not None:
                grad = grad.index_select(1, inverse)
            for g in range(len(groups) - 1, -1, -1):
                low, size = groups[g]
                position -= 1
                grads[g].append(_group_rotation_grad(grad, saved[position], low, size, n))
                grad = _apply_group(grad, per_layer[g][layer], low, size, n, transpose=True)
        # d loss / d theta = 1/2 d loss / d half angle (ry_groups: from each group's rotations)
        theta_grad = [
            group_rotations_half_angle_grad(rotation, torch.stack(per_group[::-1], dim=1)) / 2
            for rotation, per_group in zip(rotations, grads, strict=True)
        ]  # [B, L, size] per group
        # groups run most significant first: reversed, the last axis is qubits 0..n-1
        return torch.cat(theta_grad[::-1], dim=-1), None, None, None


@without_autocast
def _run_circuit(theta: torch.Tensor, groups: tuple, gather, inverse) -> torch.Tensor:
    return _Circuit.apply(theta, groups, gather, inverse)


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
    gather = _ladder_gather_index(n, theta.device) if n > 1 else None
    inverse = _ladder_inverse_index(n, theta.device) if n > 1 else None
    state = _run_circuit(flat, tuple(qubit_groups(n)), gather, inverse)
    return state.reshape(*lead, 2**n)


def qnn_probabilities(theta: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Measurement probabilities ``|<i|psi(theta)>|^2`` of :func:`qnn_statevector`.

    ``theta``: [..., L, n] -> [..., 2**n], summing to 1 over the last dim, little-endian basis order
    (qubit 0 = least significant bit of ``i``). Differentiable; O(L * n * 2**n) per batch element.
    ``validate``: as for :func:`qnn_statevector`."""
    amplitudes = qnn_statevector(theta, validate=validate)
    return amplitudes * amplitudes
