"""Quantum-PEFT adapter layers: ``y = base(x) + (x·V)·(U·diag(λ_eff))ᵀ`` (λ_eff carries the
scaling); with the offset start (``init_lambda`` non-zero) minus the frozen start's
``(x·V₀)·(U₀·diag(λ₀_eff))ᵀ``, both as one rank-2K pair: ``(x·[V V₀])·[U·diag(λ_eff)
−U₀·diag(λ₀_eff)]ᵀ`` (LoRA's two thin matmuls at rank 2K; zero at init to float rounding).

U (d_out x K) and V (d_in x K) have orthonormal columns by construction; they are generated from
the circuit angles once per layer forward (``qpeft.circuits.stiefel``), in ``circuit_dtype``, and
U·diag(λ_eff) is formed with them, then both are cast to the input's dtype. The token path is
LoRA's: two thin matmuls. The forward costs like LoRA at rank K plus the generation
(O(L·n·N·K) for the Pauli circuit); no N x N matrix is ever formed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from qpeft.circuits.stiefel import stiefel_init, stiefel_many, stiefel_num_params, stiefel_pair
from qpeft.tuners._batched_generation import BatchedGeneration, KeptConstant, Params
from qpeft.tuners._common import WeightMergeLayer, matrix_to_weight

from .config import QuantumPEFTConfig

# Parameterizations whose parameters are rotation angles (quantized on the circle); the others
# (Lie-algebra coordinates) are quantized on a symmetric range like λ.
ANGLE_PARAMETERIZATIONS = ("pauli", "generalized")
_RY_PERIOD = 4.0 * math.pi  # RY(θ + 2π) = -RY(θ): the gate's period is 4π


@dataclass(frozen=True)
class AdapterSpec:
    """Static description of one adapter on one layer (no tensors)."""

    method_u: str
    method_v: str
    out_features: int
    in_features: int
    r: int
    depth: int
    intrinsic_rank: int | None
    lambda_domain: str
    quantize_bits: int | None
    scaling: float
    circuit_dtype: torch.dtype
    #: (g_u, g_v): effective angle = g · stored angle (``QuantumPEFTConfig.angle_gains``)
    angle_gains: tuple[float, float] = (1.0, 1.0)
    #: the offset start: the layer subtracts ΔW₀ of its stored start (angles_u₀, angles_v₀, λ₀)
    offset: bool = False

    @property
    def rank(self) -> int:
        """Rank of ΔW's LoRA factors (the export): K, or 2K with the offset start."""
        return 2 * self.r if self.offset else self.r

    def num_params(self) -> int:
        """Trainable numbers of this adapter: P_u + P_v + K (+1 gain). Must equal the config's
        ``count_module`` and the numel of the layer's tensors (tests check both)."""
        return (
            stiefel_num_params(self.method_u, self.out_features, self.r, self.depth)
            + stiefel_num_params(self.method_v, self.in_features, self.r, self.depth)
            + self.r
            + (0 if self.lambda_domain == "real" else 1)
        )


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value exactly ``q`` (``x - x.detach()`` is an exact zero), gradient of the
    identity w.r.t. ``x``."""
    return q.detach() + (x - x.detach())


def quantize_angles(theta: torch.Tensor, bits: int) -> torch.Tensor:
    """Round angles to the uniform grid of ``2**bits`` points on RY's period 4π (step 4π/2**bits),
    straight-through gradient. Values are not wrapped: each result equals, modulo 4π, one of the
    2**bits codes. Shape preserved, O(numel)."""
    step = _RY_PERIOD / (2**bits)
    return _straight_through(theta, torch.round(theta / step) * step)


def quantize_symmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform quantizer on [-max|x|, max|x|] with 0 representable (2**bits - 1 levels for
    bits >= 2; bits == 1 gives ±max|x|), straight-through gradient. Shape preserved, O(numel)."""
    m = x.detach().abs().amax()
    if bits == 1:
        q = torch.where(x >= 0, m, -m)
    else:
        step = torch.clamp(m / (2 ** (bits - 1) - 1), min=torch.finfo(x.dtype).tiny)
        q = torch.round(x / step) * step
    return _straight_through(x, q)


def _seed(init_seed: int, module_name: str, side: str) -> int:
    """Deterministic 31-bit seed from the config seed, the module's name and the side."""
    return zlib.crc32(f"{init_seed}:{module_name}:{side}".encode()) & 0x7FFFFFFF


def _quantize_params(p: torch.Tensor, method: str, bits: int) -> torch.Tensor:
    if method in ANGLE_PARAMETERIZATIONS:
        return quantize_angles(p, bits)
    return quantize_symmetric(p, bits)


def circuit_params(spec: AdapterSpec, angles_u: torch.Tensor,
                   angles_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw angles -> what the circuits consume: the circuit dtype, times the angle gains, and
    the quantization grid (straight-through) when the adapter quantizes. O(P_u + P_v)."""
    au = angles_u.to(spec.circuit_dtype) * spec.angle_gains[0]
    av = angles_v.to(spec.circuit_dtype) * spec.angle_gains[1]
    if spec.quantize_bits is not None:
        au = _quantize_params(au, spec.method_u, spec.quantize_bits)
        av = _quantize_params(av, spec.method_v, spec.quantize_bits)
    return au, av


def stiefel_factors(spec: AdapterSpec, angles: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [d_out, K], V [d_in, K]) of one adapter layer from its raw (angles_u, angles_v)."""
    au, av = circuit_params(spec, *angles)
    return stiefel_pair((spec.method_u, spec.method_v), (au, av),
                        (spec.out_features, spec.in_features), spec.r, spec.depth)


def lambda_unscaled(spec: AdapterSpec, raw: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """λ_eff / scaling [K] in the circuit dtype from the stored λ (or ρ) and gain: domain map,
    quantization, intrinsic-rank mask. O(K log K)."""
    raw = raw.to(spec.circuit_dtype)
    if spec.quantize_bits is not None and spec.lambda_domain != "sign":
        raw = quantize_symmetric(raw, spec.quantize_bits)
    if spec.lambda_domain == "real":
        lam = raw
    else:
        g = gain.to(spec.circuit_dtype)
        if spec.lambda_domain == "positive":
            lam = g * F.softplus(raw)
        else:
            lam = g * _straight_through(raw, torch.where(raw >= 0, 1.0, -1.0).to(raw.dtype))
    if spec.intrinsic_rank is not None and spec.intrinsic_rank < spec.r:
        order = torch.sort(lam.detach().abs(), descending=True, stable=True).indices
        mask = torch.zeros_like(lam).scatter(0, order[: spec.intrinsic_rank], 1.0)
        lam = lam * mask
    return lam


def scaled_factors(spec: AdapterSpec, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """What one layer's forward consumes, (B, A) with ΔW = B·Aᵀ, in the circuit dtype, from its
    (angles_u, angles_v, λ[, gain]) — the layer's ``factor_inputs``: (U·diag(λ_eff) [d_out, K],
    V [d_in, K]). With the offset start ``params`` ends with the start (angles_u₀, angles_v₀,
    λ₀) and the factors are rank 2K: ([U·diag(λ_eff), −U₀·diag(λ₀_eff)], [V, V₀])."""
    u, v = stiefel_factors(spec, params[:2])
    gain = params[3] if len(params) > 3 and not spec.offset else None
    ul = u * (lambda_unscaled(spec, params[2], gain) * spec.scaling)
    if not spec.offset:
        return ul, v
    with torch.no_grad():  # the start is a constant
        u0, v0 = stiefel_factors(spec, params[3:5])
        ul0 = u0 * (lambda_unscaled(spec, params[5], None) * -spec.scaling)
    return torch.cat([ul, ul0], dim=1), torch.cat([v, v0], dim=1)


def is_circuit_layer(spec: AdapterSpec, angles: Params) -> bool:
    """Both sides are circuits with free angles: the layers a :class:`CircuitGroup` batches."""
    return all(m in ANGLE_PARAMETERIZATIONS for m in (spec.method_u, spec.method_v)) and all(
        a.numel() for a in angles)


class CircuitGroup:
    """The circuit layers of one adapter with one (r, depth, circuit dtype) — its *members* —
    whose factors (U·diag(λ_eff), V) are generated as one batched program per width
    (:func:`stiefel_many`: the angle gains and λ_eff multiplied in once per width, not once per
    layer) by the first member that asks in a training step and handed to the others through
    :class:`BatchedGeneration` (``qpeft/tuners/_batched_generation.py``: why that is correct
    under checkpointing, FSDP, DDP, compile). E.g. SmolLM2's 30 q_proj and 30 v_proj layers:
    two programs (widths 576 and 192) instead of 60. Outside training, or when some member cannot
    be read as a plain parameter, a layer generates its own factors (:func:`scaled_factors`).
    A member's parameters: its ``factor_inputs`` (angles_u, angles_v, λ[, gain]; with the
    offset start, then its start angles_u₀, angles_v₀, λ₀ — buffers, read, never trained).

    Owned by the tuner (``QuantumPEFTModel.generation_groups``); a member layer holds plain data
    (``qpeft_index[adapter]``, its slot) and one unregistered reference to this group
    (``qpeft_group[adapter]``), as a QPA layer does to its generator. The group holds what it
    batches over, the members' angle stores (their ``qpeft_angles_u`` / ``qpeft_angles_v``
    ParameterDicts) and λ stores (``qpeft_lambda`` / ``qpeft_gain``), read by adapter name at
    every generation, so parameters replaced in them —
    a low-memory load, FSDP — are seen), never a layer. ``copy.deepcopy`` / pickling a model
    copy it once, with the members' stores (Python's memo): no custom copy code."""

    def __init__(self, adapter_name: str, specs: list[AdapterSpec],
                 stores: list[tuple[nn.ParameterDict, nn.ParameterDict]],
                 lambda_stores: list[tuple[nn.ParameterDict, nn.ParameterDict]],
                 start_stores: list[tuple[nn.Module, nn.Module, nn.Module]]) -> None:
        self.adapter_name = adapter_name
        self.specs = specs
        self.stores = stores
        self.lambda_stores = lambda_stores
        self.start_stores = start_stores
        self.start_factors = KeptConstant()  # the offset start's factors: constants
        self.shared = BatchedGeneration(self.generate_all, self.generate_one, n_outputs=2)

    def generate_one(self, member: int, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        return scaled_factors(self.specs[member], params)

    def generate_all(self, params: list[Params]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        spec = self.specs[0]  # one adapter: one r, depth and start
        sides = [(raw[:2], raw[3] if len(raw) > 3 and not spec.offset else None, raw[2])
                 for raw in params]
        if not spec.offset:
            return self._program(sides, 1.0)
        # the start's factors (−U₀·diag(λ₀_eff), V₀) are constants: generated once (no
        # autograd) and kept while the start buffers are unwritten; appended to the current
        # factors' columns once per batched program (rank 2K), so no gradient reaches them
        start = self.start_factors.get(
            [t for raw in params for t in raw[3:6]],
            lambda: self._program([(raw[3:5], None, raw[5]) for raw in params], -1.0))
        return self._program(sides, 1.0, [f for pair in start for f in pair])

    def _program(self, sides: list[tuple[Params, torch.Tensor | None, torch.Tensor]],
                 sign: float, append: list[torch.Tensor] | None = None,
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every member's (sign·U·diag(λ_eff), V) from its ((angles_u, angles_v), gain, λ), as
        one batched program per width (:func:`stiefel_many`), each factor followed by its
        ``append`` columns when given."""
        methods, angles, dims, columns = [], [], [], []
        # without quantization the gains go to stiefel_many (one product per width); with it,
        # each layer's angles are snapped after its gain, as circuit_params does
        per_layer = any(spec.quantize_bits is not None for spec in self.specs)
        scales: list[float] | None = None if per_layer else []
        for spec, ((au, av), gain, lam) in zip(self.specs, sides, strict=True):
            methods += [spec.method_u, spec.method_v]
            if per_layer:
                angles += circuit_params(spec, au, av)
            else:
                angles += [au.to(spec.circuit_dtype), av.to(spec.circuit_dtype)]
                scales += spec.angle_gains
            dims += [spec.out_features, spec.in_features]
            columns += [(lambda_unscaled(spec, lam, gain), sign * spec.scaling), None]
        spec = self.specs[0]
        factors = stiefel_many(methods, angles, dims, spec.r, spec.depth, scales=scales,
                               columns=columns, append=append)
        return list(zip(factors[0::2], factors[1::2], strict=True))

    def gather(self) -> list[Params] | None:
        """Every member's current (angles_u, angles_v, λ[, gain][, start]); None if a member
        lost the adapter."""
        name = self.adapter_name
        everything = zip(self.stores, self.lambda_stores, self.start_stores, strict=True)
        if any(name not in u or name not in v or name not in lam
               or any(name not in s for s in starts) for (u, v), (lam, _), starts in everything):
            return None
        return [(u[name], v[name], lam[name], *((gain[name],) if name in gain else ()),
                 *(s[name] for s in starts))
                for (u, v), (lam, gain), starts in zip(self.stores, self.lambda_stores,
                                                       self.start_stores, strict=True)]

    def outputs(self, member: int, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``member``'s factors (:func:`scaled_factors`) given its own current
        ``params``."""
        return self.shared.outputs(member, params, self.gather)


class QuantumPEFTLayer(WeightMergeLayer):
    """Mixin holding the Quantum-PEFT tensors of one adapted layer, keyed by adapter name.

    Per adapter: ``qpeft_angles_u[name]`` [P_u], ``qpeft_angles_v[name]`` [P_v],
    ``qpeft_lambda[name]`` [K] (λ itself, or ρ for the "positive"/"sign" domains) and, for those
    domains only, ``qpeft_gain[name]`` [1]. With the offset start, the start as persistent
    buffers (saved, never trained): ``qpeft_start_u[name]`` [P_u], ``qpeft_start_v[name]``
    [P_v], ``qpeft_start_lambda[name]`` [K]."""

    adapter_layer_names = ("qpeft_angles_u", "qpeft_angles_v", "qpeft_lambda", "qpeft_gain")
    start_names = ("qpeft_start_u", "qpeft_start_v", "qpeft_start_lambda")
    other_param_names = ("qpeft_r", "qpeft_spec", "qpeft_group", "qpeft_index", *start_names)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_base_layer(base_layer, **kwargs)
        self.qpeft_angles_u = nn.ParameterDict({})
        self.qpeft_angles_v = nn.ParameterDict({})
        self.qpeft_lambda = nn.ParameterDict({})
        self.qpeft_gain = nn.ParameterDict({})
        self.qpeft_start_u = BufferDict(persistent=True)
        self.qpeft_start_v = BufferDict(persistent=True)
        self.qpeft_start_lambda = BufferDict(persistent=True)
        self.qpeft_r: dict[str, int] = {}
        self.qpeft_spec: dict[str, AdapterSpec] = {}
        # adapter -> its CircuitGroup (owned by the tuner, not a registered submodule) and this
        # layer's slot in it; set by the tuner, absent for a layer that generates alone
        self.qpeft_group: dict[str, CircuitGroup] = {}
        self.qpeft_index: dict[str, int] = {}

    def update_layer(self, adapter_name: str, config: QuantumPEFTConfig, module_name: str = "") -> None:
        """Create adapter ``adapter_name`` from ``config`` on this layer. ``module_name`` names the
        layer in errors and seeds the angle initialisation. Cost: one Stiefel init per side."""
        where = f"module {module_name!r}" if module_name else f"{type(self.get_base_layer()).__name__}"
        method_u, method_v = config.side_methods(self.out_features, self.in_features, where)
        spec = AdapterSpec(
            method_u=method_u,
            method_v=method_v,
            out_features=self.out_features,
            in_features=self.in_features,
            r=config.r,
            depth=config.depth,
            intrinsic_rank=config.intrinsic_rank,
            lambda_domain=config.lambda_domain,
            quantize_bits=config.quantize_bits,
            scaling=config.layer_scaling(self.out_features),
            circuit_dtype=getattr(torch, config.circuit_dtype),
            angle_gains=config.angle_gains(self.out_features, self.in_features),
            offset=config.offset_start,
        )
        k = config.r
        g_u = torch.Generator().manual_seed(_seed(config.init_seed, module_name, "u"))
        g_v = torch.Generator().manual_seed(_seed(config.init_seed, module_name, "v"))
        # stored = init / gain: the effective angles (and U, V) start where the paper's do
        angles_u = (stiefel_init(method_u, self.out_features, k, config.depth, g_u, torch.float64)
                    / spec.angle_gains[0]).float()
        angles_v = (stiefel_init(method_v, self.in_features, k, config.depth, g_v, torch.float64)
                    / spec.angle_gains[1]).float()
        g_l = torch.Generator().manual_seed(_seed(config.init_seed, module_name, "lambda"))
        if spec.offset:  # the start is kept; the trainable copy starts there (ΔW = 0)
            start = (angles_u, angles_v, torch.full((k,), config.init_lambda))
            for store, tensor in zip(self._start_stores(), start, strict=True):
                if tensor.numel():
                    store[adapter_name] = tensor.clone()
            lam = start[2].clone()
            if not config.init_weights:  # tests: a generic point away from the start
                angles_u = angles_u + 0.05 * torch.randn(angles_u.shape, generator=g_u)
                angles_v = angles_v + 0.05 * torch.randn(angles_v.shape, generator=g_v)
                lam = lam + 0.5 * torch.randn(k, generator=g_l) / spec.scaling
        elif config.lambda_domain == "real":
            # the random test start is the paper's ΔW (λ_eff ~ 0.5·N(0, 1)·alpha/r) under every
            # lr_scale: the "lora" scale (~2·sqrt(d_out/3)) would otherwise make ΔW dwarf W
            paper = float(config.alpha) / k if config.alpha is not None else 1.0
            lam = (torch.zeros(k) if config.init_weights
                   else 0.5 * torch.randn(k, generator=g_l) * (paper / spec.scaling))
        elif config.lambda_domain == "positive":  # softplus(ρ0) = 1
            lam = torch.full((k,), math.log(math.e - 1.0))
            if not config.init_weights:
                lam = lam + 0.3 * torch.randn(k, generator=g_l)
        else:  # sign: ρ = ±1
            lam = torch.ones(k)
            if not config.init_weights:
                lam = torch.where(torch.rand(k, generator=g_l) < 0.5, -1.0, 1.0)
        # a side of width 1 has no free angle (U = [1]): no 0-element Parameter, which could
        # never change in training (peft's contract: every trainable tensor of an adapter trains)
        for store, angles in ((self.qpeft_angles_u, angles_u), (self.qpeft_angles_v, angles_v)):
            if angles.numel():
                store[adapter_name] = nn.Parameter(angles)
        self.qpeft_lambda[adapter_name] = nn.Parameter(lam)
        if config.lambda_domain != "real":
            gain = torch.zeros(1) if config.init_weights else torch.full((1,), 0.5)
            self.qpeft_gain[adapter_name] = nn.Parameter(gain)
        self.qpeft_r[adapter_name] = k
        self.qpeft_spec[adapter_name] = spec
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ---- the update ΔW = U diag(λ_eff) Vᵀ ------------------------------------------------------

    def _start_stores(self) -> tuple[BufferDict, BufferDict, BufferDict]:
        return self.qpeft_start_u, self.qpeft_start_v, self.qpeft_start_lambda

    def start(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The offset start (angles_u₀ [P_u], angles_v₀ [P_v], λ₀ [K]), buffers; () without it.
        A side without free angles reads as an empty tensor, as in :meth:`angles`."""
        if not self.qpeft_spec[adapter_name].offset:
            return ()
        empty = self.qpeft_start_lambda[adapter_name].new_zeros(0)
        return tuple(store[adapter_name] if adapter_name in store else empty
                     for store in self._start_stores())

    def angles(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's trainable (angles_u [P_u], angles_v [P_v]); a side without free angles
        (width 1, P = 0) stores no tensor and reads as an empty one."""
        u, v = self.qpeft_angles_u, self.qpeft_angles_v
        if adapter_name in u and adapter_name in v:  # every circuit layer: no placeholder
            return u[adapter_name], v[adapter_name]
        empty = self.qpeft_lambda[adapter_name].new_zeros(0)
        return tuple(store[adapter_name] if adapter_name in store else empty for store in (u, v))

    def circuit_params(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (angles_u, angles_v) the circuits consume: cast to the circuit dtype and, when the
        adapter quantizes, snapped to its grid (straight-through). O(P_u + P_v)."""
        return circuit_params(self.qpeft_spec[adapter_name], *self.angles(adapter_name))

    def stiefel_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [d_out, K], V [d_in, K]) with orthonormal columns, in the adapter's circuit dtype,
        generated from the current angles. Cost O(L·n·N·K) for Pauli circuits; O(N·K²) for Lie
        maps; never N x N. Generated by this layer alone (the forward reads U·diag(λ_eff) from
        its adapter's :class:`CircuitGroup` while training: :meth:`_factors_for`)."""
        return stiefel_factors(self.qpeft_spec[adapter_name], self.angles(adapter_name))

    def effective_lambda(self, adapter_name: str) -> torch.Tensor:
        """λ_eff [K] in the circuit dtype: domain map, quantization, intrinsic-rank mask and
        scaling applied. O(K log K)."""
        spec = self.qpeft_spec[adapter_name]
        return lambda_unscaled(spec, self.qpeft_lambda[adapter_name],
                               self.qpeft_gain.get(adapter_name)) * spec.scaling

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [d_out, rank], A [d_in, rank]) with ΔW = B·Aᵀ, in the circuit dtype, generated by
        this layer alone (:func:`scaled_factors`): rank K, or 2K with the offset start
        (``qpeft_spec[name].rank``). The LoRA export's factors."""
        return scaled_factors(self.qpeft_spec[adapter_name], self.factor_inputs(adapter_name))

    def delta_matrix(self, adapter_name: str) -> torch.Tensor:
        """ΔW as an ``[out, in]`` matrix in the circuit dtype. With the offset start the start's
        product is subtracted from the current one (two products of the same kernels: exactly
        zero at init, so merging an untrained adapter leaves W as it is). O(d_out·d_in·rank) —
        only for merging and tests; the forward never builds it."""
        b, a = self.factors(adapter_name)
        k = self.qpeft_spec[adapter_name].r
        if b.shape[1] == k:
            return b @ a.T
        return b[:, :k] @ a[:, :k].T - (-b[:, k:]) @ a[:, k:].T

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW laid out like the base layer's weight (Conv1D transposed, Conv2d 4-D), circuit dtype."""
        return matrix_to_weight(self.get_base_layer(), self.delta_matrix(adapter_name))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """peft's ``convert_to_lora``: ΔW is exactly rank K (2K with the offset start), so
        peft's SVD at that rank gives ΔW as ``qpeft export-lora`` does (peft converts linear
        layers only)."""
        return self.kind != "conv2d"

    # ---- merge / unmerge (additive, exact up to rounding) ---------------------------------------

    def _owns_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.qpeft_lambda

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W + ΔW, computed in the circuit dtype."""
        return weight.to(self.qpeft_spec[adapter_name].circuit_dtype) + self.get_delta_weight(adapter_name)

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W − ΔW (exact up to rounding)."""
        return weight.to(self.qpeft_spec[adapter_name].circuit_dtype) - self.get_delta_weight(adapter_name)

    # ---- forward ---------------------------------------------------------------------------------

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _forward_active(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus every active adapter's low-rank update."""
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = result + self._adapter_output(x, name).to(result.dtype)
        return result

    def _apply_one(self, x: torch.Tensor, base_out: torch.Tensor, adapter_name: str,
                   *args: Any, **kwargs: Any) -> torch.Tensor:
        return base_out + self._adapter_output(x, adapter_name).to(base_out.dtype)

    def factor_inputs(self, adapter_name: str) -> list[torch.Tensor]:
        """What the adapter's factors depend on: its trainable tensors (angles, λ, gain), then
        its offset start (buffers) when it has one."""
        tensors = [*self.angles(adapter_name), self.qpeft_lambda[adapter_name]]
        if adapter_name in self.qpeft_gain:
            tensors.append(self.qpeft_gain[adapter_name])
        return [*tensors, *self.start(adapter_name)]

    def _factors_for(self, x: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors (B, A) of :func:`scaled_factors` in ``x``'s dtype: from the adapter's
        :class:`CircuitGroup` (one batched generation per training step) or generated by this
        layer alone."""
        params = tuple(self.factor_inputs(adapter_name))
        spec = self.qpeft_spec[adapter_name]
        group = self.qpeft_group.get(adapter_name)
        if group is None:
            build = lambda: scaled_factors(spec, params)  # noqa: E731
        else:
            build = lambda: group.outputs(self.qpeft_index[adapter_name], params)  # noqa: E731
        ul, v = self._generated(adapter_name, params, build)
        dtype = x.dtype if x.is_floating_point() else ul.dtype
        return ul.to(dtype), v.to(dtype)


class QuantumPEFTLinear(nn.Module, QuantumPEFTLayer):
    """Quantum-PEFT on ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2; weight stored [in, out]).
    Forward: x [..., d_in] -> [..., d_out]; adapter cost O(batch·(d_in + d_out)·K)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QuantumPEFTConfig,
                 module_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        QuantumPEFTLayer.__init__(self, base_layer, **kwargs)
        if self.kind not in ("linear", "conv1d"):
            raise ValueError(f"QuantumPEFTLinear wraps nn.Linear / Conv1D, got {self.kind}")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        ul, v = self._factors_for(x, adapter_name)
        return (x.to(ul.dtype) @ v) @ ul.T

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_dispatch(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "qpeft." + super().__repr__()


class QuantumPEFTConv2d(nn.Module, QuantumPEFTLayer):
    """Quantum-PEFT on ``nn.Conv2d`` (groups=1): the update is a conv with Vᵀ reshaped to
    [K, in_ch, kh, kw] (same stride/padding/dilation as the base), then a 1x1 conv with
    U·diag(λ_eff). Cost O(batch·H'·W'·K·(in_ch·kh·kw + out_ch)); no unfold."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QuantumPEFTConfig,
                 module_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        QuantumPEFTLayer.__init__(self, base_layer, **kwargs)
        if self.kind != "conv2d":
            raise ValueError(f"QuantumPEFTConv2d wraps nn.Conv2d, got {self.kind}")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        ul, v = self._factors_for(x, adapter_name)
        base = self.get_base_layer()
        kernel = v.T.reshape(v.shape[1], *base.weight.shape[1:])
        h = base._conv_forward(x.to(ul.dtype), kernel, None)
        return F.conv2d(h, ul[:, :, None, None])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_dispatch(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "qpeft." + super().__repr__()


__all__ = [
    "AdapterSpec",
    "CircuitGroup",
    "QuantumPEFTConv2d",
    "QuantumPEFTLayer",
    "QuantumPEFTLinear",
    "quantize_angles",
    "quantize_symmetric",
]
