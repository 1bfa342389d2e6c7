"""QPA's model-wide generator: QNN angles theta + a mapping MLP -> the LoRA factors of every layer.

Pure torch + ``qpeft.circuits`` (no peft): used by the tuner layers and, without any model, by the
LoRA export. Pipeline (papers.md section 3), for ``m`` target numbers in total:

1. chunking: ``n_ch = ceil(m / n_mlp)`` chunks, ``N = max(1, ceil(log2 n_ch))`` qubits;
2. ``p = qnn_probabilities(theta)`` (theta: [L, N]), 2**N probabilities, transformed to ``p~``
   ("centered": ``2**N * p - 1``, mean 0 by construction; "reference": the paper's
   ``(0.6 tanh(0.1 * 2**(N-1) * p))**0.15`` mean-centred over all 2**N entries);
3. MLP input per chunk ``i < n_ch``: the N bits of ``i`` as Z eigenvalues (bit b -> 1 - 2b, qubit 0 =
   least significant bit, first) and ``p~_i`` -> ``n_mlp`` numbers;
4. flatten, truncate to ``m`` (optionally mean-centre), split per layer into peft-LoRA factors:
   ``lora_B`` (d_out x r, first d_out*r numbers, row-major) then ``lora_A`` (r x d_in).
   ``delta_W = (alpha / r) * lora_B @ lora_A``.

Identity at init, two ways (``output_gain``: a trainable scalar gain ``g`` multiplies every
``lora_B``):

- zero start (``start_gain=0``): ``g`` starts at 0, like LoRA's zero B: delta_W = 0 exactly. But
  ``d delta_W / d phi`` is proportional to ``g`` for every generator parameter ``phi`` (theta, MLP),
  so at the first step only the gain learns, and the rest follows only as fast as ``g`` grows.
- offset start (``start_gain=g0 != 0``): ``g`` starts at ``g0`` and the frozen start is subtracted,
  ``delta_W = (alpha / r) * (g * B(phi) A(phi) - g0 * B(phi0) A(phi0))`` with ``phi0`` a frozen copy
  of the parameters at init (persistent buffers ``start_*``, saved with the adapter, never
  trained): delta_W = 0 at init and every parameter gets gradient ``g0 * ...`` from step 1. A
  layer's factors are then rank 2r: ``[g B, -g0 B0]`` and ``[A; A0]``; the start factors are
  generated from ``phi0`` once and kept (not saved) while ``phi0`` is unchanged. At init the two
  halves cancel to round-off (the zero start: bit for bit).

``output_gain=False`` (the reference preset) starts from a random delta_W.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from qpeft.circuits._checks import check_positive_int
from qpeft.circuits.statevector import MAX_QUBITS, qnn_num_params, qnn_probabilities
from qpeft.tuners._batched_generation import BatchedGeneration, KeptConstant, same_values

REFERENCE_HIDDEN = (32, 64, 128, 128, 64, 32, 32)
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "none")
PROB_TRANSFORMS = ("centered", "reference")

__all__ = [
    "ACTIVATIONS",
    "PROB_TRANSFORMS",
    "REFERENCE_HIDDEN",
    "QPAGenerator",
    "chunking",
    "generator_num_params",
    "mlp_num_params",
    "parameters_fixed",
    "target_size",
]

_ALWAYS_KEPT = 1 << 16  # generated numbers kept for evaluation whatever the layers' size
# the block inside which parameters are known not to change (parameters_fixed); None outside
_fixed_scope: ContextVar[object | None] = ContextVar("qpa_fixed_scope", default=None)


@contextmanager
def parameters_fixed() -> Iterator[None]:
    """Declare that no generator parameter changes inside this block (one model forward, or one
    ``generate()`` call: ``QPAModel`` opens it around every ``PeftModel`` forward). Inside it a
    generator compares its parameters with the snapshot behind its kept factors
    (:meth:`QPAGenerator.kept_factors`) once, not once per layer that reads them. Nested blocks
    are one block. O(1)."""
    if _fixed_scope.get() is not None:
        yield
        return
    token = _fixed_scope.set(object())
    try:
        yield
    finally:
        _fixed_scope.reset(token)


class _Kept:
    """Every layer's factors generated outside autograd, with a copy of the parameters they
    were generated from and the :func:`parameters_fixed` block that last confirmed them."""

    __slots__ = ("snapshot", "factors", "scope")

    def __init__(self, snapshot: list[torch.Tensor],
                 factors: list[tuple[torch.Tensor, torch.Tensor]], scope: object | None) -> None:
        self.snapshot, self.factors, self.scope = snapshot, factors, scope


class _KeptSlot:
    """Holds a generator's :class:`_Kept` (or None). A copy (``copy.deepcopy``, pickling)
    starts empty: the copy's parameters are other tensors, compared afresh."""

    def __init__(self) -> None:
        self.entry: _Kept | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"entry": None}


class _AppendStart(torch.autograd.Function):
    """``(lora_B, lora_A, -g0 B0, A0) -> ([lora_B, -g0 B0], [lora_A; A0])``: the offset start
    appended to one layer's factors. The start is a constant (no gradient), so the backward
    only slices the current factors' part of each gradient: one operation per factor, where
    ``torch.cat``'s backward slices every input (a training step dispatches this once per
    adapted layer; ``python -m benchmarks.dispatch``)."""

    @staticmethod
    def forward(ctx: Any, lora_b: torch.Tensor, lora_a: torch.Tensor, neg_b0: torch.Tensor,
                a0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.r = lora_a.shape[0]
        ctx.set_materialize_grads(False)
        return torch.cat((lora_b, neg_b0), dim=1), torch.cat((lora_a, a0), dim=0)

    @staticmethod
    def backward(ctx: Any, grad_b: torch.Tensor | None,
                 grad_a: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        r = ctx.r
        return (None if grad_b is None else grad_b[:, :r],
                None if grad_a is None else grad_a[:r], None, None)


class _GainedRows(torch.autograd.Function):
    """The generator's output layer and its gain as one node: ``(hidden [n_ch, h], W [n_mlp,
    h], b [n_mlp], g, b_rows [m / r, 1] bool) -> rows [m / r, r]``, the first ``m`` numbers of
    ``hidden·Wᵀ + b`` read as rows of ``r``, each lora_B row (``b_rows``) times ``g``. Autograd
    would keep the rows for the gain's gradient: as many numbers as the LoRA factors they are
    (2.4 MiB on one 7B-shaped layer's 7 linears). This node keeps what the output layer keeps
    anyway (hidden, W) and recomputes the rows in its backward: one more addmm
    (O(n_ch · h · n_mlp)), the same values and gradients."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                gain: torch.Tensor, b_rows: torch.Tensor, r: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, bias, gain, b_rows)
        ctx.r = r
        return _output_rows(hidden, weight, bias, b_rows, r) * torch.where(b_rows, gain, 1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, gain, b_rows = ctx.saved_tensors
        grad_gain = None
        if ctx.needs_input_grad[3]:
            rows = _output_rows(hidden, weight, bias, b_rows, ctx.r)
            grad_gain = torch.where(b_rows, grad * rows, 0.0).sum().reshape(gain.shape)
        grad_rows = (grad * torch.where(b_rows, gain, 1.0)).reshape(-1)
        full = hidden.shape[0] * weight.shape[0]  # the last chunk's unused outputs: no gradient
        if grad_rows.numel() < full:
            grad_rows = torch.cat((grad_rows, grad_rows.new_zeros(full - grad_rows.numel())))
        grad_out = grad_rows.view(hidden.shape[0], weight.shape[0])
        return (grad_out @ weight if ctx.needs_input_grad[0] else None,
                grad_out.mT @ hidden if ctx.needs_input_grad[1] else None,
                grad_out.sum(0) if ctx.needs_input_grad[2] else None,
                grad_gain, None, None)


def _output_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 b_rows: torch.Tensor, r: int) -> torch.Tensor:
    """The first ``b_rows.shape[0] · r`` outputs of ``hidden·Wᵀ + b`` as rows of ``r``."""
    return torch.addmm(bias, hidden, weight.mT).view(-1)[: b_rows.shape[0] * r].view(-1, r)


def target_size(shapes: Sequence[tuple[int, int]], r: int) -> int:
    """``m = sum r * (d_out + d_in)``: numbers of the LoRA factors of all ``(d_out, d_in)`` layers.
    O(#layers)."""
    check_positive_int("r", r)
    return sum(r * (int(o) + int(i)) for o, i in shapes)


def chunking(m: int, n_mlp: int, n_qubits: int | None = None) -> tuple[int, int]:
    """``(n_ch, N)``: ``n_ch = ceil(m / n_mlp)`` chunks and the qubit count covering them.

    ``N = max(1, ceil(log2 n_ch))`` unless ``n_qubits`` is given (then ``2**n_qubits`` must cover
    ``n_ch``). ValueError with the numbers when it cannot, or when N > MAX_QUBITS (memory). O(1)."""
    check_positive_int("m (target size)", m)
    check_positive_int("n_mlp", n_mlp)
    n_ch = -(-m // n_mlp)
    needed = max(1, math.ceil(math.log2(n_ch))) if n_ch > 1 else 1
    if n_qubits is None:
        if needed > MAX_QUBITS:
            raise ValueError(
                f"QPA needs N={needed} qubits for m={m:,} target numbers with n_mlp={n_mlp} "
                f"({n_ch:,} chunks), more than the {MAX_QUBITS} simulated (memory: 2**N "
                f"amplitudes); use n_mlp >= {-(-m // 2**MAX_QUBITS)}"
            )
        return n_ch, needed
    check_positive_int("n_qubits", n_qubits)
    if n_qubits > MAX_QUBITS:
        raise ValueError(
            f"n_qubits must be in [1, {MAX_QUBITS}] (memory: 2**N amplitudes), got {n_qubits}"
        )
    if 2**n_qubits < n_ch:
        raise ValueError(
            f"n_qubits={n_qubits} gives 2**{n_qubits}={2**n_qubits} chunks of n_mlp={n_mlp} "
            f"numbers = {2**n_qubits * n_mlp:,}, but the targeted layers need m={m:,}; use "
            f"n_qubits >= {needed} or n_mlp >= {-(-m // 2**n_qubits)}"
        )
    return n_ch, n_qubits


def mlp_num_params(n_qubits: int, hidden: Sequence[int], n_mlp: int) -> int:
    """Weights + biases of the MLP (N+1) -> hidden... -> n_mlp. O(len(hidden))."""
    widths = [n_qubits + 1, *hidden, n_mlp]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


def generator_num_params(
    n_qubits: int, depth: int, n_mlp: int, hidden: Sequence[int], output_gain: bool
) -> int:
    """Trainable numbers of :class:`QPAGenerator`: ``N*L + MLP + (1 if output_gain)``.

    With the reference widths this is the paper's ``N*L + 32*N + 38,400 + 33*n_mlp``. O(1)."""
    return qnn_num_params(n_qubits, depth) + mlp_num_params(n_qubits, hidden, n_mlp) + int(
        bool(output_gain)
    )


_ACTIVATION_FNS = {
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "none": None,
}


def _circuit_probabilities(theta: torch.Tensor) -> torch.Tensor:
    """The QNN's 2**N probabilities from angles ``theta`` [L, N]; half-precision angles (a model
    cast with ``.half()`` after wrapping) run in float32. No input checks: theta is the
    generator's own parameter (the finiteness check is a reduction and a device sync)."""
    if theta.dtype not in (torch.float32, torch.float64):
        theta = theta.float()
    return qnn_probabilities(theta, validate=False)


def _all_probabilities(params: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """:func:`_circuit_probabilities` for :class:`BatchedGeneration`' one member (the generator)."""
    return [(_circuit_probabilities(theta),) for (theta,) in params]


def _one_probabilities(member: int, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (_circuit_probabilities(params[0]),)


def _activation(name: str):
    if name not in _ACTIVATION_FNS:
        raise ValueError(f"mlp_activation must be one of {ACTIVATIONS}, got {name!r}")
    return _ACTIVATION_FNS[name]


class QPAGenerator(nn.Module):
    """theta [L, N] + MLP (+ zero-initialised gain) generating the LoRA factors of all layers.

    ``shapes``: the ``(d_out, d_in)`` of every targeted layer, in slicing order. ``forward()``
    returns the flat generated vector [m]; :meth:`factors` generates one layer's
    ``(lora_B, lora_A)`` alone: the circuit (all 2**N probabilities), then the MLP only on the
    chunks that hold the layer's numbers (centring: the mean in closed form from input sums when
    the MLP is affine, else from every chunk's hidden activations). So each adapted layer can
    generate its own factors inside its own forward. While training, the first layer's
    :meth:`factors` generates every layer's ``(lora_B, lora_A)`` in one call (circuit, MLP and
    gain; each factor a separate output in its final shape) and the others read theirs
    (``_generated``, a :class:`BatchedGeneration`); where that cannot batch (a sharded or
    offloaded generator) each layer generates its own slice, sharing only the circuit's
    probabilities (``_probabilities``). Outside autograd (evaluation, serving) every layer's
    factors are generated at once and kept while the parameters hold their values
    (:meth:`kept_factors`). Cost of a full generation: O(L*N*2**N) circuit + O(n_ch * (sum of
    MLP layer sizes)) MLP."""

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        r: int,
        n_mlp: int,
        depth: int,
        n_qubits: int | None = None,
        hidden: Sequence[int] = REFERENCE_HIDDEN,
        activation: str = "gelu",
        prob_transform: str = "centered",
        center_output: bool = False,
        output_gain: bool = True,
        init_seed: int | None = None,
        gain_init: float = 0.0,
        out_multiplier: float = 1.0,
        start_gain: float = 0.0,
        start_from_init: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("r", r)
        check_positive_int("depth", depth)
        if not shapes:
            raise ValueError("QPAGenerator needs at least one target layer shape, got none")
        for k, width in enumerate(hidden):
            check_positive_int(f"mlp_hidden[{k}]", width)
        if prob_transform not in PROB_TRANSFORMS:
            raise ValueError(f"prob_transform must be one of {PROB_TRANSFORMS}, got {prob_transform!r}")
        _activation(activation)  # validate early
        self.shapes = [(int(o), int(i)) for o, i in shapes]
        self.r = r
        self.m = target_size(self.shapes, r)
        self.n_mlp = n_mlp
        self.n_chunks, self.n_qubits = chunking(self.m, n_mlp, n_qubits)
        self.depth = depth
        self.prob_transform = prob_transform
        self.center_output = center_output
        offsets, pos = [], 0
        for o, i in self.shapes:
            offsets.append(pos)
            pos += r * (o + i)
        self.offsets = offsets

        if not (isinstance(out_multiplier, (int, float)) and math.isfinite(out_multiplier)
                and out_multiplier > 0):
            raise ValueError(f"out_multiplier must be a finite number > 0, got {out_multiplier!r}")
        gen = torch.Generator().manual_seed(init_seed) if init_seed is not None else None
        theta = (torch.rand(depth, self.n_qubits, generator=gen) * 2 - 1) * math.pi
        self.theta = nn.Parameter(theta)
        widths = [self.n_qubits + 1, *hidden, n_mlp]
        # The MLP's weights are direct parameters ``mlp_weight_k`` [out, in] / ``mlp_bias_k`` (no
        # nested modules): peft < 0.21 re-inserts the adapter name right after the ``qpa_``
        # component of a checkpoint key, which only round-trips for one level below it.
        self.activation = activation
        self.n_mlp_layers = len(widths) - 1
        if not (isinstance(start_gain, (int, float)) and math.isfinite(start_gain)):
            raise ValueError(f"start_gain must be a finite number, got {start_gain!r}")
        if start_gain != 0 and not output_gain:
            raise ValueError(
                f"start_gain={start_gain} needs output_gain=True (the offset start subtracts "
                "g0 * B(phi0) A(phi0) and trains the gain from g0)")

        def draw_mlp() -> list[tuple[torch.Tensor, torch.Tensor]]:
            layers = []
            for k, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
                linear = nn.Linear(a, b)  # nn.Linear's default init, then flattened
                # the output layer is stored divided by its multiplier: the generated numbers at
                # init are nn.Linear's whatever the multiplier (it only speeds up their steps)
                div = float(out_multiplier) if k == len(widths) - 2 else 1.0
                layers.append((linear.weight.data / div, linear.bias.data / div))
            return layers

        with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            for k, (weight, bias) in enumerate(draw_mlp()):
                self.register_parameter(f"mlp_weight_{k}", nn.Parameter(weight))
                self.register_parameter(f"mlp_bias_{k}", nn.Parameter(bias))
            # the offset start's phi0: a frozen copy of the init (identity at init), or with
            # start_from_init=False a second, independent draw (a random start that still
            # subtracts a start: tests of every path through the offset)
            if start_gain != 0 and start_from_init:
                start = [(self.theta.data.clone(),)]
                start_mlp = [(w.data.clone(), b.data.clone()) for w, b in self.mlp_params()]
            elif start_gain != 0:
                start = [((torch.rand(depth, self.n_qubits, generator=gen) * 2 - 1) * math.pi,)]
                start_mlp = draw_mlp()
        self.out_multiplier = float(out_multiplier)
        self.gain = nn.Parameter(torch.full((1,), float(gain_init))) if output_gain else None
        # g0 as the float32 gain parameter holds it (0.1 is not a float32): the start cancels
        # the gain's own start value, also after the generator is cast to float64
        self.start_gain = float(torch.tensor(float(start_gain), dtype=torch.float32))
        if self.start_gain != 0:
            # persistent buffers: saved with the adapter (keys ``qpa_generator.start_*``), loaded
            # by peft like the parameters, never trained nor counted
            self.register_buffer("start_theta", start[0][0])
            for k, (weight, bias) in enumerate(start_mlp):
                self.register_buffer(f"start_mlp_weight_{k}", weight)
                self.register_buffer(f"start_mlp_bias_{k}", bias)
        self._start = KeptConstant()  # the offset start's factors (constants)
        # while training, the first layer's forward generates every layer's numbers (circuit and
        # MLP, one call) and the others read their slices (qpeft.tuners._batched_generation: why that is
        # safe under any wrapper); where that cannot batch (a sharded or offloaded generator),
        # each layer runs the MLP on its own chunks, reading one shared circuit simulation
        # (two outputs per layer: its lora_B and lora_A in their final shapes, gain applied)
        self._generated = BatchedGeneration(self._generate_all_from, self._generate_one_from,
                                            n_outputs=2 * len(self.shapes))
        self._probabilities = BatchedGeneration(_all_probabilities, _one_probabilities, n_outputs=1)
        # outside autograd (evaluation, serving): every layer's factors from one generation,
        # kept while the parameters hold the same values (kept_factors)
        self._kept = _KeptSlot()
        self._keeps_factors = self.m <= max(sum(o * i for o, i in self.shapes) // 8, _ALWAYS_KEPT)
        idx = torch.arange(self.n_chunks)
        bits = (idx.unsqueeze(1) >> torch.arange(self.n_qubits)) & 1
        self.register_buffer("bits", (1 - 2 * bits).float(), persistent=False)
        # the flat vector read as rows of r numbers: lora_B_0 (d_out rows), lora_A_0 (d_in rows),
        # lora_B_1, ...; True on the rows of a lora_B (the ones the gain multiplies)
        self._row_sizes = [rows for o, i in self.shapes for rows in (o, i)]
        b_rows = torch.tensor([k % 2 == 0 for k, n in enumerate(self._row_sizes) for _ in range(n)])
        self.register_buffer("b_rows", b_rows.unsqueeze(1), persistent=False)

    def num_params(self) -> int:
        """Trainable numbers, from the construction's count function (tests compare)."""
        hidden = [w.shape[0] for w, _ in self.mlp_params()][:-1]
        return generator_num_params(
            self.n_qubits, self.depth, self.n_mlp, hidden, self.gain is not None
        )

    def mlp_params(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(weight [out, in], bias [out]), ...]``: the MLP's parameters as stored (the output
        layer divided by ``out_multiplier``), input to output."""
        return [
            (getattr(self, f"mlp_weight_{k}"), getattr(self, f"mlp_bias_{k}"))
            for k in range(self.n_mlp_layers)
        ]

    def _effective(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Stored MLP layers -> the layers the generation applies (output layer times
        ``out_multiplier``)."""
        if self.out_multiplier == 1.0:
            return list(layers)
        weight, bias = layers[-1]
        return [*layers[:-1], (weight * self.out_multiplier, bias * self.out_multiplier)]

    def mlp_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(weight [out, in], bias [out]), ...]`` of the mapping MLP as the generation applies
        it (output layer times ``out_multiplier``), input to output."""
        return self._effective(self.mlp_params())


    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The mapping MLP on ``x`` [n, N+1] -> [n, n_mlp]; activation between layers only."""
        weight, bias = self.mlp_layers()[-1]
        return torch.nn.functional.linear(self._hidden(x, self.mlp_layers()), weight, bias)

    def _hidden(self, x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The MLP ``layers`` up to (not including) the output layer: [n, N+1] -> [n, last
        hidden width]."""
        act = _activation(self.activation)
        for weight, bias in layers[:-1]:
            x = torch.nn.functional.linear(x, weight, bias)
            if act is not None:
                x = act(x)
        return x

    def transformed_probabilities(self) -> torch.Tensor:
        """``p~`` [2**N] from the circuit (see the module docstring). O(L*N*2**N) the first time
        in a training step; the probabilities are then shared while theta keeps its values
        (:class:`qpeft.tuners._batched_generation.BatchedGeneration`), the O(2**N) transform is not."""
        theta = self.theta
        (p,) = self._probabilities.outputs(0, (theta,), lambda: [(theta,)])
        return self._transform(p)

    def _transform(self, p: torch.Tensor) -> torch.Tensor:
        """``p~`` from the probabilities ``p`` [2**N]. O(2**N)."""
        n = self.n_qubits
        if self.prob_transform == "centered":
            return p * 2**n - 1
        # the paper's transform; clamp keeps d/dp finite where a probability is exactly 0
        pt = (0.6 * torch.tanh(0.1 * 2 ** (n - 1) * p)).clamp_min(1e-12) ** 0.15
        return pt - pt.mean()

    def _mlp_input(self, pt: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """MLP inputs of chunks ``first..last-1`` [last - first, N+1]: each chunk's N bits as Z
        eigenvalues, then its ``p~`` (from ``pt`` [2**N])."""
        dtype = self.mlp_weight_0.dtype
        bits = self.bits[first:last].to(device=pt.device, dtype=dtype)
        return torch.cat([bits, pt[first:last].to(dtype).unsqueeze(1)], dim=1)

    def _output_mean(self, hidden: torch.Tensor,
                     layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Mean of the m generated numbers from every chunk's last hidden activations
        [n_ch, h]: the output layer is affine, so the sum over a chunk's outputs is
        ``h · Σ_j W_j + Σ_j b_j``. O(n_ch · h)."""
        weight, bias = layers[-1]
        full = self.n_chunks - 1
        rest = self.m - full * self.n_mlp  # outputs used from the last chunk (1..n_mlp)
        total = hidden[:full].sum(0) @ weight.sum(0) + full * bias.sum()
        total = total + hidden[full] @ weight[:rest].sum(0) + bias[:rest].sum()
        return total / self.m

    def _affine_output_mean(self, pt: torch.Tensor,
                            layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """:meth:`_output_mean` when the MLP has no activation (affine end to end): the sum of
        the full chunks' hidden activations is the body applied to the sum of their inputs
        (each bias counted once per chunk), so no chunk's hidden row is formed. O(N·h + Σ
        MLP layer sizes) instead of O(n_ch · Σ MLP layer sizes)."""
        weight, bias = layers[-1]
        full = self.n_chunks - 1
        rest = self.m - full * self.n_mlp
        inputs = self._mlp_input(pt, 0, self.n_chunks)
        # row 0: Σ of the full chunks' inputs (bias weight ``full``); row 1: the last chunk
        x = torch.stack((inputs[:full].sum(0), inputs[full]))
        for w, b in layers[:-1]:  # (no tensor from host data: a host-to-device copy syncs)
            x = x @ w.T + torch.stack((full * b, b))
        total = x[0] @ weight.sum(0) + full * bias.sum() + x[1] @ weight[:rest].sum(0)
        return (total + bias[:rest].sum()) / self.m

    def _generate_span(self, start: int, stop: int, pt: torch.Tensor | None = None,
                       layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                       ) -> torch.Tensor:
        """Generated numbers ``[start, stop)`` of the flat vector (centred when configured, gain
        not applied) from ``p~`` ``pt`` and the MLP ``layers`` (default: the generator's own):
        the MLP runs on the chunks holding them only, except that centring with a nonlinear MLP
        needs every chunk's last hidden activations."""
        pt = self.transformed_probabilities() if pt is None else pt
        layers = self.mlp_layers() if layers is None else layers
        first, last = start // self.n_mlp, (stop - 1) // self.n_mlp + 1
        mean = None
        if self.center_output and self.activation != "none":
            every = self._hidden(self._mlp_input(pt, 0, self.n_chunks), layers)
            hidden, mean = every[first:last], self._output_mean(every, layers)
        else:
            hidden = self._hidden(self._mlp_input(pt, first, last), layers)
            if self.center_output:
                mean = self._affine_output_mean(pt, layers)
        weight, bias = layers[-1]
        rows = torch.nn.functional.linear(hidden, weight, bias).reshape(-1)
        offset = first * self.n_mlp
        flat = rows[start - offset : stop - offset]
        return flat if mean is None else flat - mean

    def _shared_params(self) -> tuple[torch.Tensor, ...]:
        """What the whole generation reads: theta, each MLP layer's weight and bias, then the
        gain (when there is one)."""
        gain = () if self.gain is None else (self.gain,)
        return (self.theta, *(t for pair in self.mlp_params() for t in pair), *gain)

    def _generate_from(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The flat vector [m] (gain not applied) from ``params`` (as :meth:`_shared_params`
        orders them) in place of the generator's own: the pure function
        :class:`BatchedGeneration` runs."""
        return self._generate_span(0, self.m, *self._inputs_from(params))

    def _inputs_from(self, params: tuple[torch.Tensor, ...]
                     ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``(p~, effective MLP layers)`` from ``params`` (as :meth:`_shared_params` orders
        them). O(circuit)."""
        theta, *rest = params
        mlp = rest[: 2 * self.n_mlp_layers]
        layers = self._effective(list(zip(mlp[0::2], mlp[1::2], strict=True)))
        return self._transform(_circuit_probabilities(theta)), layers

    def _rows_from(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``[m / r, r]``: the generated numbers as rows of ``r``, the gain (if any) applied to
        every lora_B row, from ``params``. With a gain and no output centring, the output layer
        and the gain are one node that keeps no row-sized tensor (:class:`_GainedRows`);
        otherwise the rows (centred first, if configured) are multiplied as they are.
        O(circuit + MLP on every chunk)."""
        if self.gain is None or self.center_output:
            rows = self._generate_from(params).view(-1, self.r)
            return rows if self.gain is None else rows * torch.where(self.b_rows, params[-1], 1.0)
        pt, layers = self._inputs_from(params)
        hidden = self._hidden(self._mlp_input(pt, 0, self.n_chunks), layers)
        weight, bias = layers[-1]
        return _GainedRows.apply(hidden, weight, bias, params[-1], self.b_rows, self.r)

    def _layer_factors_from(self, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``(lora_B_0 [d_out, r], lora_A_0 [r, d_in], lora_B_1, ...)``: every layer's factors
        as separate outputs in their final shapes, the gain applied once to every lora_B row
        (the same products as :meth:`_split`'s ``lora_B * gain``; ``lora_A * 1`` is exact). A
        layer's forward then reads its factors as they are (no slice, reshape or gain product
        per layer and step), and its gradient arrives at its own outputs (a slice of one flat
        output would send each layer a gradient the size of the whole vector). With the offset
        start each layer's pair is rank 2r (:meth:`_with_start`). O(m) beyond the generation, one
        view per layer (and two concatenations with the offset start)."""
        pieces = self._rows_from(params).split(self._row_sizes)
        out: list[torch.Tensor] = []
        for index, (_, d_in) in enumerate(self.shapes):
            out += self._with_start(index, pieces[2 * index], pieces[2 * index + 1].view(self.r, d_in))
        return tuple(out)

    @property
    def has_start(self) -> bool:
        """Whether the offset start is on: a nonzero ``start_gain`` g0 and its frozen ``phi0``."""
        return self.start_gain != 0

    def start_buffers(self) -> list[torch.Tensor]:
        """The frozen start ``phi0`` in :meth:`_shared_params`' order without the gain: the
        ``start_theta`` buffer, then each MLP layer's ``start_mlp_weight_k`` /
        ``start_mlp_bias_k`` (as stored: the output layer divided by ``out_multiplier``). Empty
        without the offset start."""
        if not self.has_start:
            return []
        return [self.start_theta, *(
            getattr(self, f"start_mlp_{part}_{k}")
            for k in range(self.n_mlp_layers) for part in ("weight", "bias"))]

    def start_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(-g0 * B0 [d_out, r], A0 [r, d_in]), ...]`` per layer: the subtracted start,
        generated from :meth:`start_buffers` outside autograd. Kept while the buffers are the
        same tensors with the same storage and version counter (a load, hot-swap or ``.to()``
        regenerates it; so does reading them under ``torch.compile``, which traces the plain
        generation). O(1) when kept, else one generation (circuit + MLP, no backward); holds
        m numbers, like LoRA's factors, and is never saved."""
        start = self.start_buffers()
        if not start:
            raise ValueError("this QPA generator has no offset start (start_gain is 0)")

        def build() -> list[tuple[torch.Tensor, torch.Tensor]]:
            rows = self._generate_from(tuple(start)).view(-1, self.r)
            pieces = rows.split(self._row_sizes)
            return [(pieces[2 * index] * -self.start_gain, pieces[2 * index + 1].view(self.r, d_in))
                    for index, (_, d_in) in enumerate(self.shapes)]

        if torch.compiler.is_compiling():
            with torch.no_grad():
                return build()
        return self._start.get(start, build)

    def _with_start(self, index: int, lora_b: torch.Tensor,
                    lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s factors with the offset start appended: ``[g B, -g0 B0]`` [d_out,
        2r] and ``[A; A0]`` [2r, d_in], so ``B' A' = g B A - g0 B0 A0`` (a rank-2r LoRA on the
        token path). At init the two halves cancel to round-off, not bit for bit (a fused
        multiply-add keeps the first product's rounding error): float32 outputs move by ~1e-7
        of the ``B A`` terms, float64 by ~1e-16. The factors as they are without the offset.
        Two concatenations (:class:`_AppendStart`), O(r (d_out + d_in))."""
        if not self.has_start:
            return lora_b, lora_a
        neg_b0, a0 = self.start_factors()[index]
        return _AppendStart.apply(lora_b, lora_a, neg_b0.to(lora_b.dtype), a0.to(lora_a.dtype))

    def _generate_all_from(self, params: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
        return [self._layer_factors_from(ps) for ps in params]

    def _generate_one_from(self, member: int, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self._layer_factors_from(params)

    def generate(self) -> torch.Tensor:
        """The flat generated vector [m] (the gain is not applied). O(circuit + MLP)."""
        return self._generate_span(0, self.m)

    def forward(self) -> torch.Tensor:
        """:meth:`generate` (the whole vector: merging all layers, export, inspection)."""
        return self.generate()

    def _split(self, flat: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_B, lora_A)`` of layer ``index`` from its ``r·(d_out + d_in)`` numbers (gain
        applied; the offset start appended, :meth:`_with_start`)."""
        d_out, d_in = self.shapes[index]
        lora_b = flat[: d_out * self.r].view(d_out, self.r)
        lora_a = flat[d_out * self.r :].view(self.r, d_in)
        if self.gain is not None:
            lora_b = lora_b * self.gain
        return self._with_start(index, lora_b, lora_a)

    def factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_B [d_out, k], lora_A [k, d_in])`` of layer ``index`` (gain applied to lora_B;
        k = r, or 2r with the offset start: ``[g B, -g0 B0]``, ``[A; A0]``,
        :meth:`_with_start`), generated for this
        layer alone (see the class docstring). O(circuit + MLP on
        ⌈r(d_out + d_in) / n_mlp⌉ + 1 chunks), plus the MLP body on every chunk when centring
        through a nonlinear MLP."""
        if not 0 <= index < len(self.shapes):
            raise ValueError(f"layer index must be in [0, {len(self.shapes) - 1}], got {index}")
        d_out, d_in = self.shapes[index]
        start = self.offsets[index]
        stop = start + self.r * (d_out + d_in)
        own = self._shared_params()
        if self._generated.batchable([own]):
            outputs = self._generated.outputs(0, own, lambda: [own])
            return outputs[2 * index], outputs[2 * index + 1]
        return self._split(self._generate_span(start, stop), index)

    def _factors_per_span(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`factors` of every layer as it generates outside a recorded forward (each
        layer's own span, the same numbers bit for bit), with the circuit and the MLP's
        effective layers computed once for all. O(circuit + MLP on every chunk)."""
        pt, layers = self.transformed_probabilities(), self.mlp_layers()
        return [
            self._split(self._generate_span(start, start + self.r * (o + i), pt, layers), index)
            for index, ((o, i), start) in enumerate(zip(self.shapes, self.offsets, strict=True))
        ]

    def all_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`factors` of every layer from one full generation (export, merging all)."""
        flat = self.generate()
        return [
            self._split(flat[start : start + self.r * (o + i)], index)
            for index, ((o, i), start) in enumerate(zip(self.shapes, self.offsets, strict=True))
        ]

    def kept_factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`factors` of layer ``index`` for a forward autograd does not record (the
        caller decides: evaluation under ``no_grad`` / ``inference_mode`` or a frozen
        generator). Every layer's factors are generated at once (the circuit once, then each
        layer's own MLP span: bit for bit what :meth:`factors` gives) and kept while the
        parameters hold the same values: compared by value (``.data`` writes and FSDP's
        unsharding bypass version counters; one device sync on an accelerator), and inside a
        :func:`parameters_fixed` block only at its first read, so a mixed-adapter batch checks
        each adapter once per forward, not once per layer. Cost: O(1) for a read confirmed in
        the block, else O(generator parameters) to compare, plus a generation when they
        changed. Factors of more than an eighth of the adapted weights' numbers (and over 64k
        numbers; the bound of the layers' own reuse,
        :meth:`qpeft.tuners._common.WeightMergeLayer._generated`) are generated for the layer
        alone and not kept."""
        if not self._keeps_factors:
            self._kept.entry = None
            with torch.inference_mode(False), torch.no_grad():
                return self.factors(index)
        scope = _fixed_scope.get()
        entry = self._kept.entry  # read once: a concurrent reader replaces the whole entry
        if entry is not None and scope is not None and entry.scope is scope:
            return entry.factors[index]
        params = [*self.parameters(), *self.start_buffers()]
        if entry is not None and same_values(entry.snapshot, params):
            entry.scope = scope
            return entry.factors[index]
        # built as ordinary tensors even inside torch.inference_mode(): kept factors may be used
        # later by a forward that autograd records (a frozen adapter, an input with a gradient)
        with torch.inference_mode(False), torch.no_grad():
            snapshot = [p.detach().clone() for p in params]
            factors = self._factors_per_span()
        self._kept.entry = _Kept(snapshot, factors, scope)
        return factors[index]

    def extra_repr(self) -> str:
        return (
            f"layers={len(self.shapes)}, m={self.m}, r={self.r}, n_mlp={self.n_mlp}, "
            f"n_chunks={self.n_chunks}, n_qubits={self.n_qubits}, depth={self.depth}, "
            f"mlp={[w.shape[1] for w, _ in self.mlp_layers()] + [self.n_mlp]}, "
            f"activation={self.activation!r}, prob_transform={self.prob_transform!r}, "
            f"center_output={self.center_output}, gain={self.gain is not None}, "
            f"out_multiplier={self.out_multiplier:g}, start_gain={self.start_gain:g}"
        )
