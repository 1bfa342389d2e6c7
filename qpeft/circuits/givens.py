"""RBS / Givens circuits on n wires, applied to vectors without building the matrix.

Convention (shared with the export helper): the gate G(theta) on wires (i, j), i < j, maps

    x_i -> cos(theta) x_i - sin(theta) x_j
    x_j -> sin(theta) x_i + cos(theta) x_j

i.e. rows/columns i, j of the n x n matrix hold [[c, -s], [s, c]].  A circuit is a list of
parallel layers; the gates of one layer act on disjoint wire pairs.  Layer 0 is applied first,
so the circuit matrix is M = G_{L-1} ... G_1 G_0 and ``givens_apply(angles, x)`` returns M x
(x a column vector stored in the last dimension).  Angles are ordered layer by layer and, within
a layer, by the first wire of each pair.

Layouts (``GIVENS_LAYOUTS``):

* ``"pyramid"``: the triangular layout of orthogonal quantum neural networks; nearest-neighbour
  gates (i, i+1), n(n-1)/2 of them in 2n-3 layers (layer t holds the gates with
  i = n-2-t+2c for the "columns" c = 0..i).  Every matrix of SO(n) is reached exactly
  (``givens_decompose`` gives the angles).
* ``"brick"``: n alternating layers of nearest-neighbour gates, even pairs (0,1),(2,3),...
  then odd pairs (1,2),(3,4),...; n layers hold exactly n(n-1)/2 gates, like the pyramid
  (n = 2: one layer, the odd one being empty).
* ``"butterfly"``: ceil(log2 n) layers; layer s pairs (i, i + 2**s) for every i whose bit s is
  0.  For n a power of two this is the FFT butterfly with (n/2) log2 n gates.  For other n it is
  the same pattern truncated to the wires that exist (pairs with i + 2**s >= n are dropped);
  ``givens_num_params`` gives the exact count.

Note for the quantum reading: on qubits, a nearest-neighbour RBS gate acts on the
Hamming-weight-k sector exactly as the order-k compound of its Givens matrix.  A gate on
non-adjacent wires (butterfly) does so only as a fermionic beam splitter (an RBS with a
(-1)**(number of 1s strictly between i and j) phase); the tests pin this down.
"""

from __future__ import annotations

import functools

import torch

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._checks import (
    check_choice,
    check_finite,
    check_float_dtype,
    check_last_dim,
    check_positive_int,
)

GIVENS_LAYOUTS = ("pyramid", "brick", "butterfly")

__all__ = [
    "GIVENS_LAYOUTS",
    "givens_pairs",
    "givens_num_params",
    "givens_apply",
    "givens_matrix",
    "givens_decompose",
]


def _check_layout(layout: object) -> str:
    check_choice("layout", layout, GIVENS_LAYOUTS)
    return layout  # type: ignore[return-value]


def _pyramid_gates(n: int) -> list[list[tuple[int, int, int]]]:
    """Pyramid gates as (i, i+1, column) per layer; column c is the column of Q^T the gate
    zeroes in ``givens_decompose`` (layer t = n-2-i+2c)."""
    if n < 2:
        return []
    layers: list[list[tuple[int, int, int]]] = [[] for _ in range(2 * n - 3)]
    for c in range(n - 1):
        for i in range(c, n - 1):
            layers[n - 2 - i + 2 * c].append((i, i + 1, c))
    for layer in layers:
        layer.sort()
    return layers


@functools.lru_cache(maxsize=256)
def _pairs_cached(n: int, layout: str) -> tuple[tuple[tuple[int, int], ...], ...]:
    if layout == "pyramid":
        return tuple(tuple((i, j) for i, j, _ in layer) for layer in _pyramid_gates(n))
    if layout == "brick":
        layers = (tuple((i, i + 1) for i in range(t % 2, n - 1, 2)) for t in range(n))
        return tuple(layer for layer in layers if layer)  # n = 2: the odd layer is empty
    # butterfly
    layers = []
    s = 0
    while (1 << s) < n:
        step = 1 << s
        layers.append(tuple((i, i + step) for i in range(n) if not (i >> s) & 1 and i + step < n))
        s += 1
    return tuple(layers)


def givens_pairs(n: int, layout: str) -> list[list[tuple[int, int]]]:
    """Wire pairs (i, j), i < j, of each parallel layer of the circuit, in application order.

    Within a layer the pairs are disjoint and sorted by i.  Cost O(n^2) (cached).
    """
    check_positive_int("n", n)
    _check_layout(layout)
    return [list(layer) for layer in _pairs_cached(n, layout)]


def givens_num_params(n: int, layout: str) -> int:
    """Number of angles (= gates): pyramid and brick n(n-1)/2; butterfly (n/2) log2 n for n a
    power of two (the truncated pattern otherwise)."""
    check_positive_int("n", n)
    _check_layout(layout)
    return sum(len(layer) for layer in _pairs_cached(n, layout))


@tensor_table_cache(maxsize=256)
def _tables(n: int, layout: str, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer gather tables for the vectorised update x <- x * C + x[partner] * S.

    Returns (angle_idx [L, n] into angles padded with one extra slot P, partner [L, n],
    sign [L, n] in {-1, 0, +1}).  Wires idle in a layer point at slot P (cos 1, sin 0).
    """
    layers = _pairs_cached(n, layout)
    num = sum(len(layer) for layer in layers)
    n_layers = len(layers)
    angle_idx = torch.full((n_layers, n), num, dtype=torch.long)
    partner = torch.arange(n).repeat(n_layers, 1)
    sign = torch.zeros(n_layers, n)
    g = 0
    for t, layer in enumerate(layers):
        for i, j in layer:
            angle_idx[t, i] = angle_idx[t, j] = g
            partner[t, i], partner[t, j] = j, i
            sign[t, i], sign[t, j] = -1.0, 1.0
            g += 1
    dev = torch.device(device)
    return angle_idx.to(dev), partner.to(dev), sign.to(dev)


def _check_angles(angles: torch.Tensor, n: int, layout: str, values: bool = True) -> int:
    """Arguments checked on the host; with ``values`` also the angles' finiteness (a reduction
    read back: a device sync on an accelerator)."""
    check_positive_int("n", n)
    _check_layout(layout)
    check_float_dtype("angles", angles)
    num = givens_num_params(n, layout)
    check_last_dim("angles", angles, num, f"givens_num_params({n}, {layout!r})")
    if values:
        check_finite("angles", angles)
    return num


def _cos_sin(angles: torch.Tensor, n: int, layout: str, device: torch.device):
    """Full-width per-layer cos / signed-sin tensors of shape [..., L, n]."""
    angle_idx, partner, sign = _tables(n, layout, str(device))
    pad = angles.new_zeros(angles.shape[:-1] + (1,))
    cos_all = torch.cat([torch.cos(angles), pad + 1.0], dim=-1)
    sin_all = torch.cat([torch.sin(angles), pad], dim=-1)
    flat = angle_idx.reshape(-1)
    lead = angles.shape[:-1]
    cos_full = cos_all.index_select(-1, flat).reshape(lead + tuple(angle_idx.shape))
    sin_full = sin_all.index_select(-1, flat).reshape(lead + tuple(angle_idx.shape))
    return cos_full, sin_full * sign.to(angles.dtype), partner


def _apply_last(angles: torch.Tensor, x: torch.Tensor, n: int, layout: str) -> torch.Tensor:
    cos_full, sin_full, partner = _cos_sin(angles, n, layout, x.device)
    lead = torch.broadcast_shapes(angles.shape[:-1], x.shape[:-1])
    x = x.expand(lead + (n,))  # also when there are no layers (n = 1)
    for t in range(partner.shape[0]):
        x = x * cos_full[..., t, :] + x.index_select(-1, partner[t]) * sin_full[..., t, :]
    return x


def givens_apply(angles: torch.Tensor, x: torch.Tensor, n: int, layout: str) -> torch.Tensor:
    """Apply the Givens circuit M(angles) to vectors: returns M x along the last dimension.

    angles: [..., P] with P = givens_num_params(n, layout); x: [..., n].  Leading dimensions
    broadcast against each other.  One gather and two multiply-adds per parallel layer, never
    the n x n matrix: O(L * n * batch) time with L the number of layers (2n-3 pyramid, n brick,
    log2 n butterfly).  Differentiable in both arguments.
    """
    _check_angles(angles, n, layout)
    check_float_dtype("x", x)
    check_last_dim("x", x, n, "the number of wires n")
    return _apply_last(angles, x, n, layout)


def givens_matrix(angles: torch.Tensor, n: int, layout: str, *,
                  check_values: bool = True) -> torch.Tensor:
    """The circuit's n x n orthogonal matrix M = G_{L-1} ... G_0 (the circuit applied to I).

    angles: [..., P] -> [..., n, n] (same dtype).  O(L * n^2) per matrix. ``check_values=False``
    skips the NaN/inf check of the angles (a device sync on an accelerator; NaN angles then
    give NaN entries), for callers that own well-formed angles, as a training step does.
    """
    _check_angles(angles, n, layout, check_values)
    eye = torch.eye(n, dtype=angles.dtype, device=angles.device)
    # Row r of the result is M e_r, i.e. column r of M: transpose at the end.
    return _apply_last(angles.unsqueeze(-2), eye, n, layout).transpose(-1, -2)


def givens_decompose(
    q: torch.Tensor, atol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor an orthogonal q into pyramid Givens angles and a diagonal of signs, exactly:

        q == signs[..., :, None] * givens_matrix(angles, n, "pyramid")

    q: [..., n, n] orthogonal (|q q^T - I| <= atol, default 1e-4 for float32, 1e-8 for
    float64).  Returns angles [..., n(n-1)/2] in (-pi, pi] and signs [..., n] in {+1, -1};
    signs are all +1 except the last, which is det(q) (so q in SO(n) gives signs == 1).
    Nearest-neighbour eliminations on q^T, one vectorised step per pyramid layer: O(n^3).
    """
    check_float_dtype("q", q)
    if q.dim() < 2 or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"q must be a square matrix [..., n, n], got shape {tuple(q.shape)}")
    check_finite("q", q)
    n = q.shape[-1]
    tol = atol if atol is not None else (1e-8 if q.dtype == torch.float64 else 1e-4)
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    err = float((q @ q.transpose(-1, -2) - eye).abs().max()) if q.numel() else 0.0
    if err > tol:
        raise ValueError(f"q must be orthogonal: max |q q^T - I| = {err:.3g} exceeds atol={tol:g}")
    a = q.detach().transpose(-1, -2).clone()
    angles = []
    for layer in _pyramid_gates(n):
        ii = torch.tensor([g[0] for g in layer], device=q.device)
        jj = ii + 1
        cc = torch.tensor([g[2] for g in layer], device=q.device)
        top, bot = a[..., ii, cc], a[..., jj, cc]
        theta = torch.atan2(-bot, top)
        c, s = torch.cos(theta).unsqueeze(-1), torch.sin(theta).unsqueeze(-1)
        ri, rj = a[..., ii, :], a[..., jj, :]
        a[..., ii, :] = c * ri - s * rj
        a[..., jj, :] = s * ri + c * rj
        angles.append(theta)
    lead = q.shape[:-2]
    angles_t = torch.cat(angles, dim=-1) if angles else q.new_zeros(lead + (0,))
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    signs = torch.where(diag < 0, -torch.ones_like(diag), torch.ones_like(diag))
    return angles_t, signs
