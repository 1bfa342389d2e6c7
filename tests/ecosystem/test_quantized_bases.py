"""The three methods on bitsandbytes 4-bit (nf4, fp4; fp32 / bf16 compute) and 8-bit bases, on CPU.

Reference for every check: the same model with each quantized layer replaced by a plain linear
layer holding the *dequantized* weight (:class:`DequantizedLinear`). Measured on this CPU backend
(bitsandbytes 0.50), a quantized layer's forward in training mode equals ``F.linear`` with its
dequantized weight: bit for bit for 4-bit (fp32 and bf16 compute, the latter as
``F.linear`` in bf16), and to float32 rounding (~6e-8 relative) for 8-bit. So the quantized
model and the reference train the same adapter to float32 round-off: rtol 1e-5 over a few Adam
steps. (8-bit layers in eval mode also quantize their *inputs* to int8, ~0.5 % relative; the
merge checks therefore run in training mode, where only the weight's quantization remains.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

import qpeft
from qpeft.quantize import quantize_linear_layers

bnb = pytest.importorskip("bitsandbytes")
from peft.utils.integrations import dequantize_bnb_weight  # noqa: E402

TARGETS = ["0", "2"]
QUANTS = {
    "nf4": dict(bits=4, quant_type="nf4"),
    "fp4": dict(bits=4, quant_type="fp4"),
    "nf4-bf16": dict(bits=4, quant_type="nf4", compute_dtype=torch.bfloat16),
    "8bit": dict(bits=8),
}
METHODS = ("quantum_peft", "quic", "qpa")


def make_config(method: str, **overrides):
    if method == "quantum_peft":
        return qpeft.QuantumPEFTConfig(r=4, target_modules=TARGETS, init_seed=3, **overrides)
    if method == "quic":
        return qpeft.QuICConfig(target_modules=TARGETS, **overrides)
    return qpeft.QPAConfig(
        r=4, target_modules=TARGETS, n_mlp=64, mlp_hidden=[8], depth=2, init_seed=3, **overrides
    )


def float_model() -> nn.Module:
    # widths that bitsandbytes' CPU kernels handle on every CPU: input widths a multiple of the
    # 4-bit blocksize (64) and output widths a multiple of 32.  On CPUs with AVX512-BF16,
    # bitsandbytes 0.50 quantizes a 40x48 weight with ~40 % error (row length 48 < 64) and
    # refuses an eval-mode 4-bit forward whose output width is not a multiple of 32 ("N must
    # be divisible by block_n"); LoRA on those shapes fails the same way.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 8)
    )


def quantized_model(quant: str) -> nn.Module:
    model = float_model()
    names = quantize_linear_layers(model, skip_modules=["4"], **QUANTS[quant])
    assert names == TARGETS
    return model


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The float weight a bitsandbytes layer stands for ([out, in], float32)."""
    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()


class DequantizedLinear(nn.Linear):
    """A float linear layer computing like a bitsandbytes layer with the same (dequantized)
    weight: the matmul in ``compute_dtype``, the result in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__(weight.shape[1], weight.shape[0])
        self.weight.data.copy_(weight)
        self.bias.data.copy_(bias.float())
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.compute_dtype
        return F.linear(x.to(d), self.weight.to(d), self.bias.to(d)).to(x.dtype)


def reference_model(quantized: nn.Module, quant: str) -> nn.Module:
    model = copy.deepcopy(float_model())
    compute = QUANTS[quant].get("compute_dtype", torch.float32)
    for name in TARGETS:
        layer = quantized.get_submodule(name)
        # bitsandbytes' forward casts its bias to the compute dtype in place: round it likewise
        bias = layer.bias.data.to(compute).float()
        model._modules[name] = DequantizedLinear(dequantized(layer), bias, compute)
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 64, generator=g), torch.randint(0, 8, (16,), generator=g)


def wrap(model: nn.Module, method: str, **overrides) -> nn.Module:
    torch.manual_seed(7)  # QuIC's random init (init_weights=False) draws from torch's RNG
    return get_peft_model(model, make_config(method, **overrides))


def perturb(peft_model: nn.Module, scale: float = 1.0) -> None:
    """Move every trainable adapter number away from its start (a visibly non-identity adapter)
    by ``scale`` standard normal steps."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def train(peft_model: nn.Module, steps: int = 5) -> list[float]:
    x, t = inputs()
    peft_model.train()
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(peft_model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("method", METHODS)
def test_wrap_shapes_identity_and_training_match_dequantized_float(method, quant):
    qmodel = quantized_model(quant)
    ref = reference_model(qmodel, quant)
    x, _ = inputs()
    with torch.no_grad():
        base_out = qmodel(x)
    pq, pf = wrap(qmodel, method), wrap(ref, method)
    # true layer shapes (the 4-bit weight is stored packed as [out*in/2, 1])
    for name, (d_out, d_in) in zip(TARGETS, [(128, 64), (64, 128)], strict=True):
        layer = pq.base_model.model.get_submodule(name)
        assert (layer.out_features, layer.in_features) == (d_out, d_in)
        assert type(layer.get_base_layer()).__module__.startswith("bitsandbytes")
    # same adapter tensors (names, shapes, values; float32 even for a bf16 compute dtype)
    sq, sf = adapter_state(pq), adapter_state(pf)
    assert sq.keys() == sf.keys() and sq
    for key in sq:
        assert sq[key].dtype == torch.float32, key
        assert torch.equal(sq[key], sf[key]), key
    # identity at init (the offset starts, Quantum-PEFT's and QPA's: their two halves cancel to
    # float rounding)
    with torch.no_grad():
        if getattr(pq.peft_config["default"], "offset_start", False):
            torch.testing.assert_close(pq(x), base_out, atol=1e-5, rtol=0)
        else:
            assert torch.equal(pq(x), base_out)
    # a few training steps: same losses and adapter as on the dequantized float model
    lq, lf = train(pq), train(pf)
    assert lq[-1] < lq[0]
    torch.testing.assert_close(torch.tensor(lq), torch.tensor(lf), rtol=1e-5, atol=0)
    start, sq, sf = sq, adapter_state(pq), adapter_state(pf)
    assert all(not torch.equal(sq[key], start[key]) for key in sq), "every tensor trained"
    for key in sq:
        torch.testing.assert_close(sq[key], sf[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("quant", list(QUANTS))
def test_quic_no_grad_with_many_tokens_on_a_quantized_base(quant):
    """With no gradient and more tokens than the weight's other side, QuIC's cost model rotates
    a float base's weight instead of the activations; a quantized base's stored weight is
    packed, so it must rotate the activations — same outputs as on the dequantized float model."""
    from qpeft.circuits.compound_rotation import rotation_costs  # noqa: F401  (the cost model exists)

    qmodel = quantized_model(quant)
    ref = reference_model(qmodel, quant)
    pq, pf = wrap(qmodel, "quic"), wrap(ref, "quic")
    perturb(pq)
    perturb(pf)
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(3))
    pq.train(), pf.train()  # bitsandbytes' 8-bit eval path also quantizes the inputs
    with torch.no_grad():
        torch.testing.assert_close(pq(x), pf(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, quant, tmp_path):
    pq = wrap(quantized_model(quant), method)
    perturb(pq)
    x, _ = inputs()
    pq.eval()
    with torch.no_grad():
        expected = pq(x)
    pq.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_model(quant), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def _quantization_error(layer: nn.Module, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||x·(deq(Q(T)) − T)ᵀ||: how far quantizing the float weight ``target`` with the layer's own
    scheme moves the layer's output on ``x``, computed with bitsandbytes' functional API."""
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        packed, state = bnb.functional.quantize_4bit(
            target.contiguous(), blocksize=weight.blocksize, quant_type=weight.quant_type,
            compress_statistics=weight.compress_statistics,
        )
        requantized = bnb.functional.dequantize_4bit(packed, state)
    else:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(target.to(torch.float16))
        requantized = bnb.functional.int8_vectorwise_dequant(cb, scb)
    return (x @ (requantized.float() - target).T).norm()


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("method", METHODS)
def test_merge_requantizes_within_quantization_error(method, quant):
    overrides = {} if method == "qpa" else {"init_weights": False}
    pq = wrap(quantized_model(quant), method, **overrides)
    # Quantum-PEFT's update is linear in lambda: three steps make its effect on the output
    # well above the requantization error (a unit step is ~2.7x it with fp4)
    perturb(pq, scale=3.0 if method == "quantum_peft" else 1.0)
    pq.train()  # 8-bit eval forwards also quantize the input: keep only the weight's error
    x = inputs()[0]
    layers = {name: pq.base_model.model.get_submodule(name) for name in TARGETS}
    h = {"0": x, "2": torch.tanh(torch.randn(16, 128, generator=torch.Generator().manual_seed(2)))}
    with torch.no_grad():
        before, base_out, targets = {}, {}, {}
        for name, layer in layers.items():
            before[name] = layer(h[name])
            base_out[name] = layer.get_base_layer()(h[name])
            targets[name] = dequantized(layer.get_base_layer()) + layer.get_delta_weight(
                "default").float()
        pq.merge_adapter()
        for name, layer in layers.items():
            base = layer.get_base_layer()
            assert type(base).__module__.startswith("bitsandbytes"), "still a quantized layer"
            assert base.weight.dtype in (torch.uint8, torch.int8)
            after = layer(h[name])
            err_q = _quantization_error(base, targets[name], h[name])
            effect = (before[name] - base_out[name]).norm()
            # the check is only meaningful when the adapter moves the output well beyond the
            # quantization error (a merge that dropped ΔW would then fail)
            assert effect > 3 * err_q, (effect, err_q)
            assert (after - before[name]).norm() <= 1.5 * err_q + 1e-5 * before[name].norm()
        # unmerge: requantize (Q(T) − ΔW), back to the start within twice the quantization error
        pq.unmerge_adapter()
        for name, layer in layers.items():
            err_q = _quantization_error(layer.get_base_layer(), targets[name], h[name])
            assert (layer(h[name]) - before[name]).norm() <= 3 * err_q + 1e-5 * before[name].norm()
        unmerged_out = pq(x)
        with pq.disable_adapter():
            base_model_out = pq(x)
    merged = pq.merge_and_unload()
    with torch.no_grad():
        out = merged(x)
    assert type(merged[0]).__module__.startswith("bitsandbytes")
    # model level: the merged model is the adapted one up to requantization (measured: 4-bit
    # 0.09-0.31 of the adapter's effect on the output, 8-bit 0.001-0.011; a dropped or doubled
    # ΔW gives 1)
    ratio = (out - unmerged_out).norm() / (unmerged_out - base_model_out).norm()
    assert ratio <= (0.05 if quant == "8bit" else 0.5), ratio


@pytest.mark.parametrize("method", METHODS)
def test_merge_refuses_a_weight_it_cannot_dequantize(method):
    from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend

    pq = wrap(quantized_model("nf4"), method)
    layer = pq.base_model.model.get_submodule("0")
    layer.quantization_backend = ForwardOnlyQuantizationBackend("gptq")
    packed = layer.get_base_layer().weight.data.clone()
    with pytest.raises(ValueError, match="cannot be dequantized"):
        layer.merge()
    assert torch.equal(layer.get_base_layer().weight.data, packed)
    assert not layer.merged


def test_quantize_linear_layers_swaps_and_validates():
    model = float_model()
    x = inputs()[0]
    with torch.no_grad():
        ref = model(x)
    names = quantize_linear_layers(model, bits=8, skip_modules=["4"])
    assert names == ["0", "2"]
    assert isinstance(model[0], bnb.nn.Linear8bitLt) and isinstance(model[4], nn.Linear)
    assert type(model[4]) is nn.Linear
    model.train()
    with torch.no_grad():
        rel = (model(x) - ref).norm() / ref.norm()
    assert 0 < rel < 0.02  # int8 rows: |error| <= absmax/254 per weight
    model = float_model()
    quantize_linear_layers(model, bits=4, quant_type="fp4")
    assert all(isinstance(model[i], bnb.nn.Linear4bit) for i in (0, 2, 4))
    assert model[0].weight.quant_type == "fp4"
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_linear_layers(float_model(), bits=3)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_linear_layers(float_model(), quant_type="int4")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_linear_layers(nn.Sequential(nn.Linear(4, 4)), skip_modules=["0"])
