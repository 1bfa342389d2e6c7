"""Quantum-PEFT tuner: exact math against slow dense references (float64), parameter counts
against papers.md §1 and against peft's own count, options, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

import qpeft  # noqa: F401  (registers the method with peft)
from qpeft.circuits.pauli import pauli_gates
from qpeft.circuits.stiefel import stiefel_num_params
from qpeft.tuners.counting import count_trainable
from qpeft.tuners.quantum_peft import QuantumPEFTConfig, QuantumPEFTLayer
from qpeft.tuners.quantum_peft.layer import quantize_angles, quantize_symmetric
from tests.contract import harness as h
from tests.tuners.tower import Tower


def layers(model: nn.Module) -> dict[str, QuantumPEFTLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantumPEFTLayer)}


def n_trainable(model: nn.Module) -> int:
    return model.get_nb_trainable_parameters()[0]


class Wrap(nn.Module):
    """One adapted layer called ``layer``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def wrapped(layer: nn.Module, **kw) -> tuple[nn.Module, QuantumPEFTLayer]:
    model = get_peft_model(Wrap(layer), QuantumPEFTConfig(target_modules=["layer"], **kw))
    return model, layers(model)["base_model.model.layer"]


# ---- slow dense references ----------------------------------------------------------------------


def factor_pairs(layer: QuantumPEFTLayer) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[(U, λ_eff, V)] of the current angles, then, with the offset start, (U₀, −λ₀_eff, V₀) of
    the start buffers: ΔW = Σ U·diag(λ)·Vᵀ over the pairs."""
    from qpeft.tuners.quantum_peft.layer import stiefel_factors

    spec = layer.qpeft_spec["default"]
    pairs = [(*layer.stiefel_factors("default"), layer.effective_lambda("default"))]
    if spec.offset:
        au0, av0, lam0 = layer.start("default")
        pairs.append((*stiefel_factors(spec, (au0, av0)), -spec.scaling * lam0.to(spec.circuit_dtype)))
    return [(u.detach(), lam.detach(), v.detach()) for u, v, lam in pairs]


def reference_delta(layer: QuantumPEFTLayer) -> torch.Tensor:
    """ΔW [out, in] from explicit dense products of the factors (float64)."""
    return sum(u.double() @ torch.diag(lam.double()) @ v.double().T for u, lam, v in factor_pairs(layer))


def dense_pauli(angles: torch.Tensor, n: int, depth: int) -> torch.Tensor:
    """The circuit's full 2**n x 2**n matrix from explicit Kronecker products (qubit 0 = LSB)."""
    eye2 = torch.eye(2, dtype=torch.float64)
    q_mat = torch.eye(2**n, dtype=torch.float64)
    for kind, wires, idx in pauli_gates(n, depth):
        if kind == "ry":
            t = angles[idx] / 2
            g = torch.stack([torch.stack([t.cos(), -t.sin()]), torch.stack([t.sin(), t.cos()])])
            mats = [g if q == wires[0] else eye2 for q in range(n)]
        else:
            cz = torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64))
            mats = [eye2] * n
            mats = mats[: wires[0]] + [cz] + mats[wires[1] + 1 :]
        full = torch.ones(1, 1, dtype=torch.float64)
        for m in mats:  # kron(G_{n-1}, ..., G_0): highest qubit first
            full = torch.kron(m, full)
        q_mat = full @ q_mat
    return q_mat


def pauli_count(n_qubits: int, depth: int) -> int:
    """papers.md §1, written out: n + 2L(n-1)."""
    return n_qubits + 2 * depth * (n_qubits - 1)


# ---- the update is U diag(λ) Vᵀ, applied without building it ------------------------------------


def test_pauli_factors_are_the_papers_circuit() -> None:
    """U and V are the first K columns of the dense RY+CZ circuit (float64, 1e-12)."""
    model, layer = wrapped(nn.Linear(8, 16).double(), r=3, depth=2, circuit_dtype="float64")
    u, v = layer.stiefel_factors("default")
    au, av = layer.qpeft_angles_u["default"], layer.qpeft_angles_v["default"]
    g_u, g_v = layer.qpeft_spec["default"].angle_gains  # effective angle = gain · stored
    torch.testing.assert_close(u, dense_pauli(g_u * au.detach(), 4, 2)[:, :3], atol=1e-12, rtol=0)
    torch.testing.assert_close(v, dense_pauli(g_v * av.detach(), 3, 2)[:, :3], atol=1e-12, rtol=0)
    assert au.numel() == pauli_count(4, 2) and av.numel() == pauli_count(3, 2)


@settings(max_examples=8, deadline=None)
@given(
    d_in=st.integers(2, 12), d_out=st.integers(2, 12), k=st.integers(1, 4),
    method=st.sampled_from(["pauli", "generalized", "lie_exp", "lie_cayley", "lie_taylor"]),
)
def test_linear_forward_and_merge_match_dense_delta(d_in, d_out, k, method) -> None:
    k = min(k, d_in, d_out)
    torch.manual_seed(d_in * 100 + d_out)
    lin = nn.Linear(d_in, d_out).double()
    model, layer = wrapped(lin, r=k, parameterization=method, init_weights=False,
                           circuit_dtype="float64", alpha=3.0)
    # lr_scale="lora" (default): λ carries (alpha / r) · sqrt(d_out / 3)
    torch.testing.assert_close(layer.effective_lambda("default").detach(),
                               layer.qpeft_lambda["default"].detach() * (3.0 / k) * math.sqrt(d_out / 3.0))
    eye_k = torch.eye(k, dtype=torch.float64)
    tol = 1e-3 if method == "lie_taylor" else 1e-10  # truncated Taylor (order 8): approximate
    assert len(factor_pairs(layer)) == 2  # the default offset start: minus the start's ΔW₀
    for u, _, v in factor_pairs(layer):
        torch.testing.assert_close(u.T @ u, eye_k, atol=tol, rtol=0)
        torch.testing.assert_close(v.T @ v, eye_k, atol=tol, rtol=0)
    delta = reference_delta(layer)
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    expected = x @ (lin.weight + delta).T + lin.bias
    torch.testing.assert_close(model(x), expected, atol=1e-10, rtol=0)
    model.merge_adapter()
    torch.testing.assert_close(lin.weight, (lin.weight - delta) + delta, atol=1e-12, rtol=0)
    torch.testing.assert_close(model(x), expected, atol=1e-10, rtol=0)


def test_conv1d_gpt2_orientation() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 8).double()  # weight [in=8, out=12]
    nn.init.normal_(conv.bias)
    model, layer = wrapped(conv, r=3, init_weights=False, circuit_dtype="float64")
    delta = layer.delta_matrix("default")  # [out, in]
    assert delta.shape == (12, 8)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    expected = x @ (conv.weight + delta.T) + conv.bias
    torch.testing.assert_close(model(x), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv2d_matches_dense_conv(padding_mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2),
                     padding_mode=padding_mode).double()
    model, layer = wrapped(conv, r=4, init_weights=False, circuit_dtype="float64")
    delta = layer.delta_matrix("default").reshape(conv.weight.shape)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    merged = nn.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2),
                       padding_mode=padding_mode).double()
    merged.load_state_dict({"weight": conv.weight + delta, "bias": conv.bias})
    torch.testing.assert_close(model(x), merged(x), atol=1e-10, rtol=0)


def test_rank_of_delta_is_at_most_k_and_k_prime() -> None:
    torch.manual_seed(0)
    _, layer = wrapped(nn.Linear(32, 64).double(), r=5, init_weights=False,
                       circuit_dtype="float64", init_lambda=0.0)  # the paper's zero start
    assert torch.linalg.matrix_rank(layer.delta_matrix("default")) == 5
    _, layer = wrapped(nn.Linear(32, 64).double(), r=5, init_weights=False,
                       circuit_dtype="float64")  # the offset start: the difference of two
    assert torch.linalg.matrix_rank(layer.delta_matrix("default")) == 10
    _, layer = wrapped(nn.Linear(32, 64).double(), r=5, intrinsic_rank=2, init_weights=False,
                       circuit_dtype="float64", init_lambda=0.0)
    lam_raw = layer.qpeft_lambda["default"].detach()
    lam = layer.effective_lambda("default")
    keep = torch.argsort(lam_raw.abs(), descending=True, stable=True)[:2]
    assert torch.equal(lam != 0, torch.zeros(5, dtype=torch.bool).index_fill(0, keep, True))
    assert torch.linalg.matrix_rank(layer.delta_matrix("default")) == 2


def test_orthonormal_factors_for_a_prime_dimension() -> None:
    _, layer = wrapped(nn.Linear(13, 997).double(), r=6, circuit_dtype="float64")
    assert layer.qpeft_spec["default"].method_u == "generalized"
    u, v = layer.stiefel_factors("default")
    assert u.shape == (997, 6) and v.shape == (13, 6)
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(v.T @ v, eye, atol=1e-10, rtol=0)


def test_gradcheck_through_the_layer_fp64() -> None:
    torch.manual_seed(0)
    model, layer = wrapped(nn.Linear(6, 8).double(), r=2, depth=2, init_weights=False,
                           circuit_dtype="float64")
    x = torch.randn(3, 6, dtype=torch.float64)
    params = [layer.qpeft_angles_u["default"], layer.qpeft_angles_v["default"],
              layer.qpeft_lambda["default"]]

    from torch.func import functional_call

    names = ["base_model.model.layer.qpeft_angles_u.default",
             "base_model.model.layer.qpeft_angles_v.default",
             "base_model.model.layer.qpeft_lambda.default"]

    def g(au, av, lam):
        return functional_call(model, dict(zip(names, (au, av, lam), strict=True)), (x,))

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(g, inputs, atol=1e-7)


def test_mixed_precision_circuits_in_float32(monkeypatch) -> None:
    import qpeft.tuners.quantum_peft.layer as layer_mod

    seen: list[torch.dtype] = []
    real = layer_mod.stiefel_pair

    def spy(methods, params, dims, k, depth, **kwargs):
        seen.extend(p.dtype for p in params)
        return real(methods, params, dims, k, depth, **kwargs)

    monkeypatch.setattr(layer_mod, "stiefel_pair", spy)
    model, layer = wrapped(nn.Linear(16, 16).to(torch.bfloat16), r=2, init_weights=False)
    out = model(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert seen and set(seen) == {torch.float32}
    ref = torch.randn(2, 16).to(torch.bfloat16)
    torch.testing.assert_close(
        model(ref).float(),
        (ref.float() @ (layer.base_layer.weight.float() + layer.delta_matrix("default")).T
         + layer.base_layer.bias.float()),
        atol=5e-2, rtol=5e-2,
    )


# ---- λ domains, quantization, scaling, init -------------------------------------------------------


def test_lambda_domains() -> None:
    _, layer = wrapped(nn.Linear(8, 8), r=4, lambda_domain="positive", init_weights=False)
    lam = layer.effective_lambda("default")
    gain = layer.qpeft_gain["default"].item()
    assert (lam / gain > 0).all()
    _, layer = wrapped(nn.Linear(8, 8), r=4, lambda_domain="sign", init_weights=False, alpha=8.0)
    lam = layer.effective_lambda("default")
    torch.testing.assert_close(lam.abs(), torch.full((4,), 0.5 * 2.0 * math.sqrt(8 / 3)))
    lam.sum().backward()  # straight-through: ρ gets a gradient
    assert layer.qpeft_lambda["default"].grad.abs().sum() > 0
    for domain in ("positive", "sign"):
        _, layer = wrapped(nn.Linear(8, 8), r=4, lambda_domain=domain)
        assert torch.equal(layer.delta_matrix("default"), torch.zeros(8, 8))


def test_quantizers() -> None:
    theta = torch.linspace(-7.0, 7.0, 101, requires_grad=True)
    q = quantize_angles(theta, 3)
    step = 4 * math.pi / 8
    torch.testing.assert_close(q / step, torch.round(q / step))
    assert (q - theta).abs().max() <= step / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(theta.grad, torch.ones_like(theta))  # straight-through
    x = torch.randn(1000)
    for bits in (1, 2, 4):
        qx = quantize_symmetric(x, bits)
        assert qx.unique().numel() <= max(2, 2**bits - 1)
        assert qx.abs().max() <= x.abs().max() + 1e-6
    assert torch.equal(quantize_symmetric(torch.zeros(3), 4), torch.zeros(3))


def test_quantized_adapter_uses_quantized_angles() -> None:
    from qpeft.circuits.stiefel import stiefel

    _, layer = wrapped(nn.Linear(8, 16).double(), r=2, quantize_bits=2, init_weights=False,
                       circuit_dtype="float64")
    au = layer.qpeft_angles_u["default"].detach() * layer.qpeft_spec["default"].angle_gains[0]
    u, _ = layer.stiefel_factors("default")
    step = 4 * math.pi / 4
    torch.testing.assert_close(u, stiefel("pauli", torch.round(au / step) * step, 16, 2, 1))
    lam = layer.effective_lambda("default").detach()
    assert lam.unique().numel() <= 3


def test_init_is_seeded_and_reproducible() -> None:
    a = h.wrap("mlp", QuantumPEFTConfig(r=2, target_modules=["lin0", "lin1"]))[0]
    b = h.wrap("mlp", QuantumPEFTConfig(r=2, target_modules=["lin0", "lin1"]))[0]
    c = h.wrap("mlp", QuantumPEFTConfig(r=2, target_modules=["lin0", "lin1"], init_seed=1))[0]
    sa, sb, sc = (dict(m.named_parameters()) for m in (a, b, c))
    key = "base_model.model.lin0.qpeft_angles_u.default"
    assert torch.equal(sa[key], sb[key]) and not torch.equal(sa[key], sc[key])
    assert sa[key].abs().sum() > 0  # a generic point, not all-zero angles


# ---- parameter counts -------------------------------------------------------------------------


@pytest.mark.parametrize("n,expected", [(1024, 64), (4096, 76)])
def test_papers_square_counts(n: int, expected: int) -> None:
    cfg = QuantumPEFTConfig(r=8, depth=1, target_modules=["layer"])
    assert cfg.count_module(n, n) == expected
    q = int(math.log2(n))
    assert expected == 2 * pauli_count(q, 1) + 8


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_pauli_count_formula_per_factor(depth: int) -> None:
    for q in range(1, 13):
        assert stiefel_num_params("pauli", 2**q, 1, depth) == pauli_count(q, depth)
    cfg = QuantumPEFTConfig(r=4, depth=depth, target_modules=["layer"])
    assert cfg.count_module(2**9, 2**6) == pauli_count(9, depth) + pauli_count(6, depth) + 4


@pytest.mark.parametrize("method", ["lie_exp", "lie_cayley", "lie_taylor"])
def test_lie_count_is_2nk_minus_k_squared(method: str) -> None:
    for n, k in [(64, 8), (768, 8), (1000, 4)]:
        cfg = QuantumPEFTConfig(r=k, parameterization=method, target_modules=["layer"])
        assert cfg.count_module(n, n) == 2 * n * k - k * k


def test_count_grows_with_log_n_not_n() -> None:
    counts = []
    for q in range(8, 13):  # N = 256 ... 4096, square layers on the meta device
        with torch.device("meta"):
            base = Wrap(nn.Linear(2**q, 2**q))
        model = get_peft_model(base, QuantumPEFTConfig(r=8, target_modules=["layer"]))
        counts.append(n_trainable(model))
    steps = {b - a for a, b in zip(counts, counts[1:], strict=False)}
    assert steps == {2 * (1 + 2 * 1)}, counts  # +2(2L+1) per doubling of N
    assert counts[-1] == 76


@pytest.mark.parametrize("case", sorted(h.TINY_MODELS))
@pytest.mark.parametrize("kw", [{}, dict(parameterization="lie_cayley", r=3),
                                dict(lambda_domain="sign", depth=2)])
def test_count_trainable_equals_peft(case: str, kw: dict) -> None:
    c = h.TINY_MODELS[case]
    kw = dict(kw)
    cfg = QuantumPEFTConfig(target_modules=list(c.target_modules), r=kw.pop("r", 2),
                            modules_to_save=list(c.modules_to_save) if c.modules_to_save else None,
                            **kw)
    predicted = count_trainable(cfg, h.build_tiny(case))
    model = get_peft_model(h.build_tiny(case), cfg)
    assert predicted.total == n_trainable(model)
    for name, layer in layers(model).items():
        spec = layer.qpeft_spec["default"]
        numel = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert numel == spec.num_params() == predicted.per_module[
            name.removeprefix("base_model.model.")]


def test_counts_from_model_configs_without_weights() -> None:
    from transformers import DebertaV2Config, GPT2Config

    from qpeft.circuits.qsd import generalized_num_params

    k, depth = 8, 1
    cfg = QuantumPEFTConfig(r=k, depth=depth, target_modules=["query_proj", "value_proj"])
    deberta = count_trainable(cfg, DebertaV2Config(hidden_size=768, num_hidden_layers=12,
                                                   num_attention_heads=12,
                                                   intermediate_size=3072))
    assert len(deberta.per_module) == 24
    per = 2 * generalized_num_params(768, k, depth) + k  # 768 = 3 * 2**8: generalized sides
    assert deberta.total == 24 * per

    cfg = QuantumPEFTConfig(r=4, depth=depth, target_modules=["c_attn"])
    gpt2m = count_trainable(cfg, GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    assert set(gpt2m.module_shapes.values()) == {(3072, 1024)}  # fused q,k,v: 1024 -> 3072
    per = generalized_num_params(3072, 4, depth) + pauli_count(10, depth) + 4
    assert gpt2m.total == 24 * per


# ---- bad input -----------------------------------------------------------------------------------


def test_r_larger_than_the_layer_allows() -> None:
    with pytest.raises(ValueError, match=r"'lin1'.*r=30.*32 x 24|'lin1'.*r <= 24"):
        h.wrap("mlp", QuantumPEFTConfig(r=30, target_modules=["lin1"]))


def test_pauli_on_a_non_power_of_two_without_auto_generalize() -> None:
    with pytest.raises(ValueError, match=r"'lin1'.*pauli.*24.*generalized"):
        h.wrap("mlp", QuantumPEFTConfig(r=2, target_modules=["lin1"], auto_generalize=False))
    _, layer = wrapped(nn.Linear(32, 24), r=2)  # auto_generalize=True: the 24 side generalises
    spec = layer.qpeft_spec["default"]
    assert (spec.method_u, spec.method_v) == ("generalized", "pauli")


def test_unknown_target_modules() -> None:
    with pytest.raises(ValueError, match="not found in the base model"):
        h.wrap("mlp", QuantumPEFTConfig(r=2, target_modules=["nope"]))


@pytest.mark.parametrize(
    "kw,match",
    [(dict(r=0), "r must"), (dict(depth=0), "depth"), (dict(r=2, intrinsic_rank=3), "intrinsic_rank"),
     (dict(parameterization="qft"), "parameterization"), (dict(lambda_domain="complex"), "lambda_domain"),
     (dict(quantize_bits=0), "quantize_bits"), (dict(circuit_dtype="float16"), "circuit_dtype")],
)
def test_config_validation(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantumPEFTConfig(target_modules=["x"], **kw)


def test_adapter_for_another_architecture(tmp_path) -> None:
    model = get_peft_model(Wrap(nn.Linear(16, 32)), QuantumPEFTConfig(r=2, target_modules=["layer"]))
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"module 'layer'.*another architecture"):
        PeftModel.from_pretrained(Wrap(nn.Linear(16, 64)), tmp_path / "a")
    # same widths: loads
    PeftModel.from_pretrained(Wrap(nn.Linear(16, 32)), tmp_path / "a")


def test_low_cpu_mem_usage_load_and_second_adapter(tmp_path) -> None:
    model, _ = h.wrap("bert", QuantumPEFTConfig(r=2, target_modules=["query", "value"],
                                                init_weights=False))
    expected = h.run(model, "bert")
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(h.build_tiny("bert"), tmp_path / "a", low_cpu_mem_usage=True)
    assert torch.equal(h.run(loaded, "bert"), expected)
    assert n_trainable(loaded) == 0  # loaded for inference by default
    loaded.load_adapter(tmp_path / "a", adapter_name="second")
    loaded.set_adapter("second")
    assert torch.equal(h.run(loaded, "bert"), expected)




@pytest.mark.parametrize("method", ["pauli", "lie_exp"])
@pytest.mark.parametrize("shape", [(1, 6), (6, 1)])
def test_a_side_of_width_one_has_no_empty_parameter_and_everything_trains(method, shape, tmp_path) -> None:
    """A 1-output (or 1-input) layer: that side's U (V) is the fixed 1 x 1 identity with no
    angles. No 0-element trainable tensor may exist (it could never change: peft's
    test_only_params_are_updated, issue 13); every trainable tensor gets a gradient and moves;
    the output is still base + (u·λ)·vᵀx (checked in float64; u·λ is formed in the circuit
    dtype, as the layer does); save/load round-trips."""
    torch.manual_seed(0)
    d_out, d_in = shape
    model, layer = wrapped(nn.Linear(d_in, d_out).double(), r=1, parameterization=method,
                           init_weights=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.numel() > 0 for p in trainable.values())
    assert sum(p.numel() for p in trainable.values()) == QuantumPEFTConfig(
        r=1, parameterization=method).count_module(d_out, d_in)
    x = torch.randn(4, d_in, dtype=torch.float64)
    expected = layer.get_base_layer()(x) + sum((x @ v.double()) @ (u * lam).double().T
                                               for u, lam, v in factor_pairs(layer))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        assert all(p.grad is not None for p in trainable.values())
        opt.step()
    assert all(not torch.allclose(before[n], p) for n, p in trainable.items())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Wrap(nn.Linear(d_in, d_out).double()), tmp_path)
    loaded.base_model.model.layer.base_layer.load_state_dict(
        model.base_model.model.layer.base_layer.state_dict())
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# one batched generation of every circuit layer per training step (CircuitGroup)


def _tower(**kw):
    torch.manual_seed(0)
    cfg = QuantumPEFTConfig(r=3, depth=2, target_modules=["q", "v", "o"], init_weights=False,
                            circuit_dtype="float64", **kw)
    return get_peft_model(Tower().double(), cfg)


def _train_grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_training_step_generates_all_circuit_layers_in_one_batched_call(monkeypatch) -> None:
    """Six layers, three widths: one stiefel_many call (three programs) per step instead of
    twelve factor pairs (six layers' and their offset starts'; the starts are generated by one
    more call in the first step and kept), with the gradients of per-layer generation (float64,
    1e-12)."""
    import qpeft.tuners._batched_generation as shared
    from qpeft.tuners.quantum_peft import layer as layer_module

    model = _tower()
    x = torch.randn(5, 24, dtype=torch.float64)
    batched, alone = [], []
    many, pair = layer_module.stiefel_many, layer_module.stiefel_pair
    monkeypatch.setattr(layer_module, "stiefel_many", lambda *a, **k: batched.append(1) or many(*a, **k))
    monkeypatch.setattr(layer_module, "stiefel_pair", lambda *a, **k: alone.append(1) or pair(*a, **k))
    model.train()
    _train_grads(model, x)
    assert (len(batched), len(alone)) == (2, 0)  # the offset start's factors, then kept
    batched.clear()
    got = _train_grads(model, x)
    assert (len(batched), len(alone)) == (1, 0)
    monkeypatch.setattr(shared, "_recording", lambda: False)  # every layer on its own
    want = _train_grads(model, x)
    assert (len(batched), len(alone)) == (1, 12)  # alone: a pair for the angles, one for the start
    assert got.keys() == want.keys() and len(got) == 6 * 3
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-12, rtol=1e-12, msg=name)


def test_a_layer_left_out_of_the_forward_gets_no_gradient() -> None:
    """Like an expert a router skipped: the batched generation covers it, its angles get None."""
    model = _tower()
    x = torch.randn(5, 24, dtype=torch.float64)
    model.train()
    block = model.base_model.model.blocks[1]
    block["o"](torch.tanh(block["v"](x))).sum().backward()  # q of block 1 and block 0 unused
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None for n, g in grads.items() if "blocks.0." in n or "blocks.1.q." in n)
    assert all(g is not None for n, g in grads.items() if "blocks.1.o." in n or "blocks.1.v." in n)


class _Shard(nn.Parameter):
    """A parameter that is a tensor subclass, as FSDP2's DTensor shards are."""


def test_a_member_that_is_no_plain_parameter_makes_each_layer_generate_alone(monkeypatch) -> None:
    """E.g. FSDP2 keeps other blocks' angles as DTensor shards: the batched call is skipped and
    every layer generates its own factors, with the same gradients."""
    from qpeft.tuners.quantum_peft import layer as layer_module

    model = _tower()
    x = torch.randn(5, 24, dtype=torch.float64)
    model.train()
    want = _train_grads(model, x)
    batched = []
    many = layer_module.stiefel_many
    monkeypatch.setattr(layer_module, "stiefel_many", lambda *a, **k: batched.append(1) or many(*a, **k))
    layer = model.base_model.model.blocks[0]["q"]
    layer.qpeft_angles_u["default"] = _Shard(layer.qpeft_angles_u["default"].detach().clone())
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    assert batched == []
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], atol=1e-12, rtol=1e-12, msg=n)


def test_copies_share_their_own_generation_and_deleting_an_adapter_leaves_it() -> None:
    """A deep copy gets its own group, over the copy's angle stores (no custom copy code); the
    tuner owns the groups, layers hold one reference and their slot; deleting the adapter drops
    both."""
    import copy

    model = _tower()
    copied = copy.deepcopy(model)
    layers = [m for m in copied.modules() if isinstance(m, QuantumPEFTLayer)]
    (group,) = {id(m.qpeft_group["default"]): m.qpeft_group["default"] for m in layers}.values()
    assert copied.base_model.generation_groups["default"] == [group]
    assert group is not model.base_model.generation_groups["default"][0]
    assert [m.qpeft_index["default"] for m in layers] == list(range(6))
    assert all(u is m.qpeft_angles_u and v is m.qpeft_angles_v
               for (u, v), m in zip(group.stores, layers, strict=True))
    assert group.shared.generate_all.__self__ is group
    assert not any(isinstance(x, QuantumPEFTLayer) for x in vars(group).values())
    model.add_adapter("second", QuantumPEFTConfig(r=2, target_modules=["q", "v"]))
    model.delete_adapter("default")
    assert all("default" not in m.qpeft_group and "default" not in m.qpeft_index
               for m in model.modules() if isinstance(m, QuantumPEFTLayer))
    assert "default" not in model.base_model.generation_groups
    model.set_adapter("second")
    model.train()
    model(torch.randn(2, 24, dtype=torch.float64)).sum().backward()
    # the copy trains through its own group: every angle of the copy gets a gradient
    copied.train()
    copied(torch.randn(2, 24, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for n, p in copied.named_parameters() if "angles" in n)
