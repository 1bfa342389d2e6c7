"""QPA's offset start (``init_gain``): delta_W = scaling * (g B(phi) A(phi) - g0 B(phi0) A(phi0)).

The base model at init, every generator parameter trained from step 1, the frozen start saved
and loaded with the adapter (not trained, not counted), and every path reading delta_W (merge,
export, hot-swap, copies) including it. Legacy adapters (no ``init_gain`` in their config) load
with the zero start.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from qpeft import count_trainable
from qpeft.tuners.qpa import QPAConfig, export_lora
from qpeft.tuners.qpa.config import DEFAULT_INIT_GAIN, DEFAULT_INIT_GAIN_WITH_HEAD
from tests.tuners.qpa.test_qpa import Stack, _slow_generation, stack_model, trained_stack

LAYERS = ["a", "b", "c", "d"]


def _layers(model):
    return [getattr(model.base_model.model, name) for name in LAYERS]


def _perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable generator parameter away from its start (as training would)."""
    gen = model.base_model.generator()
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(scale * torch.randn(p.shape, generator=noise, dtype=p.dtype))


def _start_copy(gen):
    """A copy of the generator whose trainable parameters hold the frozen start phi0."""
    start = copy.deepcopy(gen)
    names = ["theta"] + [f"mlp_{part}_{k}" for k in range(gen.n_mlp_layers)
                         for part in ("weight", "bias")]
    with torch.no_grad():
        for name in names:
            getattr(start, name).copy_(getattr(gen, f"start_{name}"))
    return start


# ------------------------------------------------------------------------------------------
# the config


@pytest.mark.parametrize(
    ("kw", "resolved"),
    [
        ({}, DEFAULT_INIT_GAIN),
        ({"init_weights": False}, DEFAULT_INIT_GAIN),
        ({"lr_scale": "paper"}, 0.0),
        ({"output_gain": False}, 0.0),
        ({"preset": "reference"}, 0.0),
        ({"init_gain": 0}, 0.0),
        ({"init_gain": 0.5, "lr_scale": "paper"}, 0.5),
        # a module trained in full beside the adapter (a fresh head) gets the smaller start
        ({"modules_to_save": ["classifier"]}, DEFAULT_INIT_GAIN_WITH_HEAD),
        ({"task_type": "SEQ_CLS"}, DEFAULT_INIT_GAIN_WITH_HEAD),
        ({"task_type": "TOKEN_CLS"}, DEFAULT_INIT_GAIN_WITH_HEAD),
        ({"task_type": "QUESTION_ANS"}, DEFAULT_INIT_GAIN_WITH_HEAD),
        ({"task_type": "CAUSAL_LM"}, DEFAULT_INIT_GAIN),
        ({"task_type": "SEQ_CLS", "init_gain": 0.3}, 0.3),
        ({"task_type": "SEQ_CLS", "lr_scale": "paper"}, 0.0),
    ],
)
def test_init_gain_resolves_and_is_recorded(kw, resolved):
    config = QPAConfig(target_modules=["a"], **kw)
    assert config.init_gain == resolved and isinstance(config.init_gain, float)
    assert config.offset_start == (resolved != 0)
    assert config.to_dict()["init_gain"] == resolved


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"init_gain": float("nan")}, "init_gain must be a finite number"),
        ({"init_gain": "1"}, "init_gain must be a finite number"),
        ({"init_gain": True}, "init_gain must be a finite number"),
        ({"init_gain": 1.0, "output_gain": False}, "needs output_gain=True"),
        ({"init_gain": 1.0, "preset": "reference"}, "needs output_gain=True"),
    ],
)
def test_bad_init_gain(kw, match):
    with pytest.raises(ValueError, match=match):
        QPAConfig(target_modules=["a"], **kw)


def test_a_config_saved_before_init_gain_loads_the_zero_start():
    legacy = QPAConfig.check_kwargs(r=3, target_modules=["a"], lr_scale="lora")
    assert QPAConfig(**legacy).init_gain == 0.0
    assert QPAConfig(**QPAConfig.check_kwargs(r=3, init_gain=1.0)).init_gain == 1.0


# ------------------------------------------------------------------------------------------
# the math


def test_the_offset_start_is_the_base_model_at_init_in_float64():
    x = torch.randn(6, 64, dtype=torch.float64)
    torch.manual_seed(0)  # stack_model's seed: the same base weights
    reference = Stack().double()(x)
    model = stack_model(torch.float64)
    gen = model.base_model.generator()
    assert gen.has_start and gen.gain.item() == pytest.approx(DEFAULT_INIT_GAIN)
    for mode in (model.train, model.eval):
        mode()
        torch.testing.assert_close(model(x), reference, atol=1e-12, rtol=0)
    for layer in _layers(model):
        assert layer.get_delta_weight("default").abs().max() < 1e-12
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("init_weights", [True, False])
def test_delta_weight_equals_the_slow_reference(init_weights):
    """g B A - g0 B0 A0, B and A from a slow chunk-by-chunk generation of phi, B0 and A0 of
    phi0 (init_weights=False: phi0 is an independent draw, so delta_W != 0 before training)."""
    model = stack_model(torch.float64, init_weights=init_weights, init_seed=3)
    gen = model.base_model.generator()
    _perturb(model)
    with torch.no_grad():
        gen.gain.fill_(0.7)
    flat, flat0 = _slow_generation(gen), _slow_generation(_start_copy(gen))
    # g0: init_gain as the float32 gain parameter holds it (0.3 is no float32)
    g, g0, r, pos = 0.7, gen.start_gain, 3, 0
    assert g0 == float(torch.tensor(DEFAULT_INIT_GAIN, dtype=torch.float32))
    for layer in _layers(model):
        d_out, d_in = layer.out_features, layer.in_features
        x = torch.randn(5, d_in, dtype=torch.float64)
        b, b0 = (f[pos : pos + d_out * r].view(d_out, r) for f in (flat, flat0))
        a, a0 = (f[pos + d_out * r : pos + r * (d_out + d_in)].view(r, d_in) for f in (flat, flat0))
        pos += r * (d_out + d_in)
        want = 2.0 * (g * b @ a - g0 * b0 @ a0)  # scaling 2 (lora_alpha = 2r)
        assert want.abs().max() > 1e-3
        for mode in (model.train, model.eval):
            mode()
            torch.testing.assert_close(layer.get_delta_weight("default"), want, atol=1e-10, rtol=0)
            torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ want.T, atol=1e-10,
                                       rtol=0)
    assert pos == gen.m


@pytest.mark.parametrize("init_gain", [1.0, 0.0])
def test_every_generator_parameter_gets_gradient_at_step_one_only_with_the_offset(init_gain):
    """d delta_W / d phi is proportional to the gain: with the zero start (init_gain=0) theta
    and the MLP get exactly zero gradient at step 1 (only the gain learns); with the offset
    start every one of their numbers does."""
    model = stack_model(torch.float64, init_gain=init_gain).train()
    gen = model.base_model.generator()
    model(torch.randn(8, 64, dtype=torch.float64)).pow(2).mean().backward()
    assert float(gen.gain.grad.abs()) > 0
    for name, p in gen.named_parameters():
        if name == "gain":
            continue
        if init_gain:
            # (a GELU MLP: an exactly zero entry would take an exact cancellation)
            assert torch.count_nonzero(p.grad) == p.numel(), name
        else:
            assert torch.count_nonzero(p.grad) == 0, name


def test_the_start_is_frozen_and_not_counted():
    model = stack_model()
    gen = model.base_model.generator()
    start = dict(gen.named_buffers())
    assert {n for n in start if n.startswith("start_")} == {
        "start_theta", *(f"start_mlp_{part}_{k}" for k in range(gen.n_mlp_layers)
                         for part in ("weight", "bias"))}
    assert not any(b.requires_grad for b in start.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == gen.num_params()
    assert count_trainable(model.peft_config["default"], Stack()).total == trainable
    assert trainable == model.peft_config["default"].count_shared(
        {name: (layer.out_features, layer.in_features) for name, layer in zip(
            LAYERS, _layers(model), strict=True)})
    assert trainable == sum(p.numel() for p in stack_model(init_gain=0.0).parameters()
                            if p.requires_grad)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: b.clone() for n, b in gen.named_buffers() if n.startswith("start_")}
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    for name, value in before.items():
        assert torch.equal(getattr(gen, name), value), name


# ------------------------------------------------------------------------------------------
# save / load, export, hot-swap, copies


def _trained(seed: int = 0, **kw):
    return trained_stack(init_seed=seed, **kw)


def test_save_load_round_trip_carries_the_start(tmp_path):
    model = _trained()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.qpa_generator.start_theta" in tensors
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_gain"] == DEFAULT_INIT_GAIN
    gen = model.base_model.generator()
    for low in (False, True):
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(Stack(), tmp_path, low_cpu_mem_usage=low)
        loaded_gen = loaded.base_model.generator()
        for name, value in gen.named_buffers():
            if name.startswith("start_"):
                assert torch.equal(getattr(loaded_gen, name), value), (low, name)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected), low


def test_a_legacy_adapter_loads_with_the_zero_start_and_no_buffers(tmp_path):
    """An adapter saved before init_gain existed: no field in adapter_config.json, no start in
    its tensors; it loads as it was trained (gain from its checkpoint, nothing subtracted)."""
    model = _trained(init_gain=0.0)
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    del saved["init_gain"]
    config_path.write_text(json.dumps(saved))
    assert not any("start_" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    for low in (False, True):
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(Stack(), tmp_path, low_cpu_mem_usage=low)
        assert loaded.peft_config["default"].init_gain == 0.0
        gen = loaded.base_model.generator()
        assert not gen.has_start and not any("start_" in n for n, _ in gen.named_buffers())
        with torch.no_grad():
            assert torch.equal(loaded(x), expected), low


def test_lora_export_is_rank_2r_and_exact(tmp_path):
    model = _trained()
    gen = model.base_model.generator()
    assert not torch.equal(gen.theta, gen.start_theta)
    lora = model.base_model.lora_state_dict()
    for name, layer in zip(LAYERS, _layers(model), strict=True):
        lora_b = lora[f"base_model.model.{name}.lora_B.weight"]
        lora_a = lora[f"base_model.model.{name}.lora_A.weight"]
        assert lora_b.shape == (layer.out_features, 6) and lora_a.shape == (6, layer.in_features)
        # the same factors the model adds: the same delta_W bit for bit
        assert torch.equal(2.0 * (lora_b @ lora_a), layer.get_delta_weight("default"))
    model.save_pretrained(tmp_path / "qpa")
    out = export_lora(tmp_path / "qpa", tmp_path / "lora")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (6, 12)
    torch.manual_seed(0)
    stock = PeftModel.from_pretrained(Stack(), out).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(stock(x), model(x), atol=1e-6, rtol=1e-6)


def test_merge_unmerge_include_the_start():
    model = stack_model(torch.float64, init_weights=False).eval()
    x = torch.randn(4, 64, dtype=torch.float64)
    with torch.no_grad():
        adapted = model(x)
        base = model.get_base_model()
        model.base_model.merge_adapter()
        torch.testing.assert_close(base(x), adapted, atol=1e-12, rtol=0)
        model.base_model.unmerge_adapter()
        torch.testing.assert_close(model(x), adapted, atol=1e-12, rtol=0)


def test_hotswap_swaps_the_start_and_its_kept_factors(tmp_path):
    """Hot-swapping writes the start buffers in place: the start factors kept from before are
    regenerated, in training (the batched generation) and in evaluation (kept factors)."""
    from qpeft.hotswap import hotswap_adapter

    donor = _trained(seed=5)
    donor.save_pretrained(tmp_path)
    model = _trained(seed=1)
    x = torch.randn(4, 64)
    with torch.no_grad():
        model(x)  # generates and keeps the start factors (and the eval factors)
    model.train()
    model(x).sum().backward()
    hotswap_adapter(model, str(tmp_path), adapter_name="default")
    gen, donor_gen = model.base_model.generator(), donor.base_model.generator()
    assert torch.equal(gen.start_theta, donor_gen.start_theta)
    with torch.no_grad():
        want = donor(x)
        assert torch.equal(model.eval()(x), want)
    # (the training path sums in another order: round-off only)
    torch.testing.assert_close(model.train()(x), want, atol=1e-5, rtol=1e-5)


def test_a_deep_copy_keeps_no_start_factors_and_follows_its_own_start():
    model = _trained()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    twin = copy.deepcopy(model)
    twin_gen = twin.base_model.generator()
    assert twin_gen._start._kept is None  # a copy starts empty
    with torch.no_grad():
        assert torch.equal(twin(x), expected)
        twin_gen.start_theta.add_(0.1)
        assert not torch.equal(twin(x), expected)
        assert torch.equal(model(x), expected)


def test_a_mixed_batch_uses_each_adapters_start():
    model = stack_model(init_weights=False, init_seed=1)
    model.add_adapter("other", QPAConfig(target_modules=LAYERS, r=3, n_mlp=100,
                                         init_weights=False, init_seed=2))
    model.eval()
    x = torch.randn(4, 64)
    routing = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        mixed = model(x, adapter_names=routing)
        for name in ("default", "other"):
            model.set_adapter(name)
            rows = [i for i, a in enumerate(routing) if a == name]
            # (a batch of two rows multiplies in another order than one of four: round-off)
            torch.testing.assert_close(mixed[rows], model(x)[rows], atol=1e-5, rtol=1e-5)


def test_a_model_built_under_inference_mode_runs() -> None:
    """Buffers made under ``torch.inference_mode()`` have no version counter: the kept start
    factors are then regenerated at each call instead of stamped (QPA's eval path keeps them)."""
    from peft import get_peft_model

    from tests.tuners.tower import Tower

    x = torch.randn(2, 24)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = get_peft_model(Tower(), QPAConfig(target_modules=["q", "v", "o"], r=2,
                                                        n_mlp=64, init_weights=False))
        model.eval()
        first = model(x)
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
