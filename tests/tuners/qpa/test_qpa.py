"""QPA beyond the contract: the generator against a slow reference, parameter counts (the paper's
106,264), one generation per forward, gradients to theta, bad input, and the export entry points."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import qpeft
from qpeft import count_trainable
from qpeft.circuits.statevector import qnn_probabilities
from qpeft.export.stock import add_export_parser
from qpeft.tuners.qpa import (
    QPAConfig,
    QPAConv2d,
    QPAGenerator,
    QPALinear,
    chunking,
    export_lora,
    generator_num_params,
)
from qpeft.tuners.qpa.generator import REFERENCE_HIDDEN
from tests.contract import harness as h


class Stack(nn.Module):
    """Four linear layers of mixed shapes (64 -> 48 -> 48 -> 32 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 48)
        self.b = nn.Linear(48, 48)
        self.c = nn.Linear(48, 32)
        self.d = nn.Linear(32, 10)

    def forward(self, x):
        return self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def stack_model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    kw.setdefault("r", 3)
    kw.setdefault("n_mlp", 100)
    cfg = QPAConfig(target_modules=["a", "b", "c", "d"], **kw)
    return get_peft_model(Stack().to(dtype), cfg)


# ------------------------------------------------------------------------------------------
# generation against a slow, obvious reference


def _slow_generation(gen: QPAGenerator) -> torch.Tensor:
    """Chunk by chunk, bit by bit, layer by layer, in float64."""
    n = gen.n_qubits
    p = qnn_probabilities(gen.theta.detach().double())
    if gen.prob_transform == "centered":
        pt = [2**n * float(p[i]) - 1 for i in range(2**n)]
    else:
        raw = [(0.6 * math.tanh(0.1 * 2 ** (n - 1) * float(p[i]))) ** 0.15 for i in range(2**n)]
        mean = sum(raw) / len(raw)
        pt = [v - mean for v in raw]
    rows = []
    for i in range(gen.n_chunks):
        bits = [1.0 - 2.0 * ((i >> q) & 1) for q in range(n)]  # qubit 0 (LSB) first
        x = torch.tensor(bits + [pt[i]], dtype=torch.float64)
        layers = gen.mlp_layers()
        for k, (weight, bias) in enumerate(layers):
            x = weight.detach().double() @ x + bias.detach().double()
            if k < len(layers) - 1:
                if gen.activation == "gelu":
                    x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
                elif gen.activation == "tanh":
                    x = torch.tanh(x)
                else:
                    assert gen.activation == "none"
        rows.append(x)
    flat = torch.cat(rows)[: gen.m]
    if gen.center_output:
        flat = flat - flat.mean()
    return flat


@pytest.mark.parametrize("kw", [{}, {"preset": "reference"}, {"mlp_activation": "tanh"}])
def test_generated_delta_weights_match_slow_reference(kw):
    model = stack_model(torch.float64, output_gain=False, **kw)
    gen = model.base_model.generator()
    assert gen.n_chunks == math.ceil(gen.m / 100) and gen.n_qubits == math.ceil(
        math.log2(gen.n_chunks)
    )
    flat = _slow_generation(gen)
    pos = 0
    for name in ["a", "b", "c", "d"]:
        layer = getattr(model.base_model.model, name)
        d_out, d_in = layer.out_features, layer.in_features
        lora_b = flat[pos : pos + d_out * 3].view(d_out, 3)
        lora_a = flat[pos + d_out * 3 : pos + 3 * (d_out + d_in)].view(3, d_in)
        pos += 3 * (d_out + d_in)
        want = 2.0 * lora_b @ lora_a  # lora_alpha defaults to 2r: scaling 2
        torch.testing.assert_close(layer.get_delta_weight("default"), want, atol=1e-10, rtol=0)
    assert pos == gen.m


def test_forward_equals_base_plus_delta():
    model = stack_model(torch.float64, output_gain=False)
    x = torch.randn(5, 64, dtype=torch.float64)
    layer = model.base_model.model.a
    want = layer.base_layer(x) + x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)


def test_reference_transform_is_mean_centred():
    gen = QPAGenerator([(50, 40)], r=4, n_mlp=16, depth=8, prob_transform="reference")
    pt = gen.transformed_probabilities().detach()
    assert pt.shape == (2**gen.n_qubits,) and abs(float(pt.mean())) < 1e-6
    gen = QPAGenerator([(50, 40)], r=4, n_mlp=16, depth=8)
    assert abs(float(gen.transformed_probabilities().detach().mean())) < 1e-6


# ------------------------------------------------------------------------------------------
# counts


def test_reference_count_gpt2_lm_head_from_a_config_without_weights():
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = QPAConfig(preset="reference", r=4, n_mlp=2048, depth=8, target_modules=["lm_head"])
    count = count_trainable(cfg, GPT2Config(), auto_class=AutoModelForCausalLM)
    assert count.module_shapes == {"lm_head": (50257, 768)}
    lora = 4 * (50257 + 768)
    assert lora == 204_100
    assert count.total == 106_264
    n, depth, n_mlp = 7, 8, 2048
    assert count.total == n * depth + 32 * n + 38_400 + 33 * n_mlp  # papers.md's formula
    assert f"{100 * count.total / lora:.2f}" == "52.06"
    # the default (identity-at-init) generator adds exactly its one gain on top
    cfg_gain = QPAConfig(**{**cfg.to_dict(), "preset": None, "output_gain": True,
                            "mlp_activation": "none", "peft_type": None})
    assert count_trainable(cfg_gain, GPT2Config(), auto_class=AutoModelForCausalLM).total == (
        106_265
    )


@pytest.mark.parametrize("case", sorted(h.TINY_MODELS))
def test_count_matches_peft(case):
    c = h.TINY_MODELS[case]
    cfg = QPAConfig(r=2, n_mlp=64, target_modules=list(c.target_modules),
                    modules_to_save=list(c.modules_to_save or []) or None)
    predicted = count_trainable(cfg, h.build_tiny(case))
    model = get_peft_model(h.build_tiny(case), cfg)
    trainable, _ = model.get_nb_trainable_parameters()
    assert predicted.total == trainable
    gen = model.base_model.generator()
    assert gen.num_params() == sum(p.numel() for p in gen.parameters()) == predicted.shared
    assert set(predicted.per_module.values()) == {0}


def test_count_below_lora_for_large_layers():
    from transformers import LlamaConfig

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
    cfg = QPAConfig(r=8, target_modules=["q_proj", "v_proj"])
    count = count_trainable(cfg, smol)
    lora = sum(8 * (o + i) for o, i in count.module_shapes.values())
    assert lora == 460_800  # peft LoRA r=8 on q_proj, v_proj of SmolLM2-135M
    assert count.total < lora / 4
    # 64 square 4096 layers: the generator (106,425) is 2.5% of LoRA's 4,194,304
    shapes = {f"l{k}": (4096, 4096) for k in range(64)}
    assert cfg.count_shared(shapes) < 0.03 * sum(8 * (o + i) for o, i in shapes.values())


def test_generator_num_params_formula():
    for n in (1, 5, 10):
        for n_mlp in (1, 64, 2048):
            assert generator_num_params(n, 8, n_mlp, REFERENCE_HIDDEN, False) == (
                n * 8 + 32 * n + 38_400 + 33 * n_mlp
            )


# ------------------------------------------------------------------------------------------
# one generation per forward; gradients


@pytest.mark.parametrize("activation", ["gelu", "none"])
@pytest.mark.parametrize("center_output", [False, True])
def test_each_layer_generates_its_own_slice_of_the_full_vector(center_output, activation):
    # each layer runs the MLP on its own chunks only (chunk boundaries fall inside layers here:
    # n_mlp = 100); the slices must be the full generation's, centring included (through
    # every chunk's hidden rows with gelu, in closed form from input sums without activation)
    gen = QPAGenerator([(16, 24), (40, 8), (8, 8), (33, 17)], r=3, n_mlp=100, depth=2,
                       hidden=(5, 7), activation=activation, center_output=center_output,
                       init_seed=3).double()
    with torch.no_grad():
        gen.gain.fill_(0.7)
    flat = gen.generate()
    torch.testing.assert_close(flat, _slow_generation(gen), atol=1e-12, rtol=0)
    if center_output:
        torch.testing.assert_close(flat.mean(), torch.zeros((), dtype=flat.dtype), atol=1e-12, rtol=0)
    for index, ((d_out, d_in), start) in enumerate(zip(gen.shapes, gen.offsets, strict=True)):
        lora_b, lora_a = gen.factors(index)
        span = flat[start : start + 3 * (d_out + d_in)]
        torch.testing.assert_close(lora_b, 0.7 * span[: 3 * d_out].view(d_out, 3), atol=1e-12, rtol=0)
        torch.testing.assert_close(lora_a, span[3 * d_out :].view(3, d_in), atol=1e-12, rtol=0)
    for (b1, a1), index in zip(gen.all_factors(), range(4), strict=True):
        b2, a2 = gen.factors(index)
        torch.testing.assert_close(b1, b2, atol=1e-12, rtol=0)
        torch.testing.assert_close(a1, a2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n_mlp", [20, 231, 462, 1000])
def test_closed_form_centring_at_chunk_edge_cases(n_mlp):
    # m = 462: many chunks with a partial last one, 2 exactly full chunks, 1 exactly full chunk
    # (no "full" chunks before the last), 1 partly used chunk; reference preset = affine MLP
    gen = QPAGenerator([(16, 24), (40, 8), (8, 8), (33, 17)], r=3, n_mlp=n_mlp, depth=3,
                       hidden=(6, 4), activation="none", center_output=True,
                       output_gain=False, init_seed=5).double()
    want = _slow_generation(gen)
    torch.testing.assert_close(gen.generate(), want, atol=1e-12, rtol=0)
    for index, ((d_out, d_in), start) in enumerate(zip(gen.shapes, gen.offsets, strict=True)):
        lora_b, lora_a = gen.factors(index)
        torch.testing.assert_close(torch.cat([lora_b.reshape(-1), lora_a.reshape(-1)]),
                                   want[start : start + 3 * (d_out + d_in)], atol=1e-12, rtol=0)


def test_gradient_accumulation_over_two_forwards():
    model = stack_model()
    x = torch.randn(4, 64)
    # two forwards/backwards before a step (gradient accumulation) must not reuse a freed graph
    model.train()
    model(x).sum().backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * g1[n])


@pytest.mark.parametrize("center_output", [False, True])
def test_a_training_step_generates_once_with_per_layer_gradients(monkeypatch, center_output):
    """Four layers read one generator: the circuit is simulated and the MLP run once per step
    (not once per layer; the backward differentiates that one generation), and the gradients
    equal those of per-layer generation (each layer's own chunks)."""
    import qpeft.tuners._batched_generation as shared
    from qpeft.tuners.qpa import generator as generator_module

    model = stack_model(dtype=torch.float64, center_output=center_output)
    with torch.no_grad():
        model.base_model.generator().gain.fill_(0.7)  # theta gets a gradient
    # the offset start's factors are generated once (first forward) and kept: not per step
    model.base_model.generator().start_factors()
    x = torch.randn(4, 64, dtype=torch.float64)
    circuits, mlps = [], []
    simulate, hidden = generator_module.qnn_probabilities, QPAGenerator._hidden
    monkeypatch.setattr(generator_module, "qnn_probabilities",
                        lambda *a, **k: circuits.append(1) or simulate(*a, **k))
    monkeypatch.setattr(QPAGenerator, "_hidden",
                        lambda self, *a: mlps.append(1) or hidden(self, *a))
    model.train()
    model(x).pow(2).sum().backward()
    assert (len(circuits), len(mlps)) == (1, 1)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    monkeypatch.setattr(shared, "_recording", lambda: False)  # every layer on its own
    model(x).pow(2).sum().backward()
    assert (len(circuits), len(mlps)) == (1 + 4, 1 + 4)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, atol=1e-12, rtol=1e-12, msg=n)


@pytest.mark.parametrize("kw", [{}, {"preset": "reference"}])
def test_a_layer_reads_its_batched_factors_without_dispatching_an_operation(kw):
    """While training, the one generation emits every layer's lora_B (gain applied) and lora_A
    as separate outputs in their final shapes: once generated, reading a layer's factors
    dispatches no operation (no slice, reshape or gain product per layer and step), and they
    are bit for bit the full generation's split per layer (:meth:`QPAGenerator.all_factors`)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    gen = stack_model(init_seed=4, **kw).base_model.generator().train()
    if gen.gain is not None:
        with torch.no_grad():
            gen.gain.fill_(0.7)
    first = gen.factors(0)  # generates every layer's factors
    with Count():
        batched = [gen.factors(index) for index in range(len(gen.shapes))]
    assert Count.ops == 0
    assert batched[0][0] is first[0] and batched[0][1] is first[1]
    with torch.no_grad():
        reference = gen.all_factors()
    rank = 2 * gen.r if gen.has_start else gen.r  # the offset start appends its own r
    for (b, a), (ref_b, ref_a), (d_out, d_in) in zip(batched, reference, gen.shapes, strict=True):
        assert b.shape == (d_out, rank) and a.shape == (rank, d_in)
        assert torch.equal(b, ref_b) and torch.equal(a, ref_a)


def test_a_deep_copy_trains_its_own_generator():
    """The shared generation is bound to its generator: a copied model's training step reads
    and differentiates the copy's parameters, never the original's."""
    import copy

    model = stack_model().train()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.base_model.generator().gain.fill_(0.5)
    x = torch.randn(4, 64)
    twin(x).pow(2).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in twin.parameters() if p.requires_grad)
    with torch.no_grad():
        expected = twin(x)
    torch.testing.assert_close(twin.train()(x), expected)
    # the copy's generation is bound to the copy (a reference to the original would keep the
    # original model alive as long as the copy)
    gen = twin.base_model.generator()
    assert gen._generated.generate_all.__self__ is gen
    assert gen._generated.generate_one.__self__ is gen


def test_zero_start_gain_gets_gradient_at_init_and_theta_after_one_step():
    """The zero start (init_gain=0): at step 1 only the gain learns (tests/tuners/qpa/
    test_offset_start.py: the offset start trains everything from step 1)."""
    model = stack_model(init_gain=0.0)
    gen = model.base_model.generator()
    x = torch.randn(8, 64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(x).pow(2).mean().backward()
    assert float(gen.gain.grad.abs()) > 0
    assert torch.count_nonzero(gen.theta.grad) == 0  # like LoRA's A while B = 0
    opt.step()
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    assert torch.count_nonzero(gen.theta.grad) == gen.theta.numel()


@pytest.mark.parametrize("n_qubits", [4, 7, 10])
def test_gradients_reach_theta_at_depth_8(n_qubits):
    torch.manual_seed(0)
    # m = 4 * (256 + 256) = 2048 numbers in 2**n_qubits chunks: every basis state is used
    gen = QPAGenerator([(256, 256)], r=4, n_mlp=2048 // 2**n_qubits, depth=8, init_seed=1)
    assert gen.n_qubits == n_qubits and gen.n_chunks == 2**n_qubits
    with torch.no_grad():
        gen.gain.fill_(1.0)
    target = torch.randn(gen.m)
    lora_b, lora_a = gen.factors(0)
    loss = (torch.cat([lora_b.reshape(-1), lora_a.reshape(-1)]) * target).sum()
    loss.backward()
    grad = gen.theta.grad
    assert grad.shape == (8, n_qubits)
    assert torch.isfinite(grad).all()
    mlp_grad = gen.mlp_weight_0.grad.abs().mean()
    # every angle gets a gradient, and not a vanishing one relative to the MLP's first layer
    assert float(grad.abs().min()) > 1e-4 * float(mlp_grad)


# ------------------------------------------------------------------------------------------
# bad input


def test_chunking_errors_name_the_numbers():
    assert chunking(204_100, 2048) == (100, 7)
    assert chunking(10, 64) == (1, 1)
    with pytest.raises(ValueError, match=r"n_qubits=3 .*m=204,100.*n_qubits >= 7"):
        chunking(204_100, 2048, n_qubits=3)
    with pytest.raises(ValueError, match=r"N=25 qubits .* more than the 24"):
        chunking(2**24 + 1, 1)
    with pytest.raises(ValueError, match=r"n_qubits must be in \[1, 24\]"):
        chunking(10, 1, n_qubits=30)
    with pytest.raises(ValueError, match="n_mlp"):
        chunking(10, 0)


def test_qubits_that_cannot_cover_the_target_raise_at_wrap_and_count():
    cfg = QPAConfig(r=4, n_mlp=8, n_qubits=2, target_modules=["a", "b"])
    with pytest.raises(ValueError, match="n_qubits=2"):
        get_peft_model(Stack(), cfg)
    with pytest.raises(ValueError, match="n_qubits=2"):
        count_trainable(cfg, Stack())
    big = QPAConfig(r=512, n_mlp=1, target_modules=["lm_head"])  # m = 26.1M > 2**24
    with pytest.raises(ValueError, match="more than the 24"):
        big.count_shared({"lm_head": (50257, 768)})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"r": 0}, "r must be"),
        ({"n_mlp": -1}, "n_mlp"),
        ({"depth": 0}, "depth"),
        ({"mlp_activation": "swish"}, "mlp_activation"),
        ({"prob_transform": "log"}, "prob_transform"),
        ({"preset": "paper"}, "preset"),
        ({"bias": "lora_only"}, "bias"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"mlp_hidden": [32, 0]}, r"mlp_hidden\[1\]"),
    ],
)
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        QPAConfig(target_modules=["a"], **kw)


def test_unsupported_layer_type_names_itself():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(WithEmbedding(), QPAConfig(target_modules=["emb"]))


def test_loading_onto_different_shapes_is_refused(tmp_path):
    model = stack_model()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    other = Stack()
    other.a = nn.Linear(64, 40)
    other.b = nn.Linear(40, 48)
    with pytest.raises(ValueError, match="saved for a different set of layers"):
        PeftModel.from_pretrained(other, tmp_path)


def test_export_of_a_non_qpa_adapter_is_refused(tmp_path):
    lora = get_peft_model(Stack(), LoraConfig(r=2, target_modules=["a"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="'LORA' adapter, not a QPA one"):
        export_lora(tmp_path / "lora", tmp_path / "out")
    with pytest.raises(ValueError, match="is not a directory"):
        export_lora(tmp_path / "missing", tmp_path / "out")


# ------------------------------------------------------------------------------------------
# save/load, export


def trained_stack(**kw):
    """:func:`stack_model` after three Adam steps on a quadratic loss (a non-identity adapter),
    in eval mode."""
    model = stack_model(**kw)
    x = torch.randn(3, 64)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model.eval()


def test_save_load_round_trip_and_low_cpu_mem_usage(tmp_path):
    model = trained_stack()
    h_x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(h_x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QPA" and [row[0] for row in saved["layout"]] == list("abcd")
    for low in (False, True):
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(Stack(), tmp_path, low_cpu_mem_usage=low)
        with torch.no_grad():
            assert torch.equal(loaded(h_x), expected)
        assert not any(p.requires_grad for p in loaded.parameters())  # inference mode


@pytest.mark.parametrize("positional", [False, True])
def test_inject_adapter_binds_peft_signature(positional):
    """``low_cpu_mem_usage`` reaches the generator however peft's ``inject_adapter`` arguments
    are passed (keyword or positional, after ``autocast_adapter_dtype``): the second adapter's
    generator is built on the meta device, the first stays real."""
    model = stack_model()
    tuner = model.base_model
    tuner.peft_config["other"] = QPAConfig(target_modules=["a", "b", "c", "d"], r=3, n_mlp=100)
    if positional:
        tuner.inject_adapter(tuner.model, "other", True, True)
    else:
        tuner.inject_adapter(tuner.model, "other", low_cpu_mem_usage=True)
    assert tuner.generator("other").theta.is_meta
    assert not tuner.generator("default").theta.is_meta


def test_export_python_and_cli_entry_points(tmp_path):
    model = stack_model()
    with torch.no_grad():
        model.base_model.generator().gain.fill_(0.5)
    model.save_pretrained(tmp_path / "qpa")
    out = export_lora(tmp_path / "qpa", tmp_path / "lora", base_model="my/base")
    cfg = json.loads((out / "adapter_config.json").read_text())
    # the offset start (default) makes the factors rank 2r; alpha doubles, the scaling is kept
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 6 and cfg["lora_alpha"] == 12
    assert cfg["base_model_name_or_path"] == "my/base"
    torch.manual_seed(0)
    lora = PeftModel.from_pretrained(Stack(), out)
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), model(x), atol=1e-6, rtol=1e-6)
    sd = model.base_model.lora_state_dict()
    assert sorted(sd) == sorted(k for k in sd if k.endswith((".lora_A.weight", ".lora_B.weight")))
    from qpeft.cli import main as cli_main

    assert cli_main(["export-lora", str(tmp_path / "qpa"), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "adapter_model.safetensors").is_file()
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"), "lora")
    args = parser.parse_args(["export-lora", "in", "out", "--base-model", "x"])
    assert (args.adapter_dir, args.out_dir, args.base_model) == ("in", "out", "x")


def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert qpeft.QPAConfig().peft_type.value == "QPA"
    assert PEFT_TYPE_TO_TUNER_MAPPING[qpeft.QPAConfig().peft_type] is qpeft.QPAModel


# ------------------------------------------------------------------------------------------
# the closing numbers on the real model (slow: run with -m slow -s)


@pytest.mark.slow
def test_smollm2_q_v_counts_and_generation_time():
    import time

    from qpeft.assets.models import load_model

    base = load_model("smollm2").model  # the asset is installed by `make install`: never skip
    lora = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    n_lora = lora.get_nb_trainable_parameters()[0]
    assert n_lora == 460_800
    base = lora.unload()
    expected = {"default": 106_305, "n_mlp=512": 55_697, "reference": 106_304}
    configs = {
        "default": QPAConfig(r=8, target_modules=["q_proj", "v_proj"]),
        "n_mlp=512": QPAConfig(r=8, n_mlp=512, target_modules=["q_proj", "v_proj"]),
        "reference": QPAConfig(r=8, preset="reference", target_modules=["q_proj", "v_proj"]),
    }
    for name, cfg in configs.items():
        predicted = count_trainable(cfg, base).total
        model = get_peft_model(base, cfg)
        trainable = model.get_nb_trainable_parameters()[0]
        assert trainable == predicted == expected[name]
        gen = model.base_model.generator()
        # one thread: with two, a core taken by another process stalls each parallel region
        # (~128 ms per generation measured on the shared 2-core machine instead of ~2.3 ms)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(3):
                gen.generate()
            no_grad, fwd_bwd = [], []
            for _ in range(20):
                with torch.no_grad():
                    t0 = time.perf_counter()
                    gen.generate()
                    no_grad.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                gen.generate().square().sum().backward()
                fwd_bwd.append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)
        no_grad, fwd_bwd = sorted(no_grad)[10], sorted(fwd_bwd)[10]  # medians
        print(
            f"| {name} | {trainable:,} | {100 * trainable / n_lora:.2f} % | {gen.n_qubits} | "
            f"{gen.n_chunks} | {1e3 * no_grad:.1f} ms | {1e3 * fwd_bwd:.1f} ms |"
        )
        base = model.unload()


@pytest.mark.slow
def test_save_load_and_export_on_peft_0_20(tmp_path):
    """peft < 0.21 picks checkpoint tensors by name prefix and re-inserts the adapter name after
    the ``qpa_`` component; the generator's flat parameter names must round-trip there too."""
    import os
    import subprocess
    import sys
    import textwrap

    target = tmp_path / "peft-0.20.0"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         "peft==0.20.0"], capture_output=True, text=True, timeout=600,
    )
    if pip.returncode != 0:
        pytest.skip(f"could not install peft==0.20.0: {pip.stderr[-300:]}")
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(target)!r}); sys.path.insert(0, {str(h.REPO_ROOT)!r})
        import peft, torch, qpeft
        assert peft.__version__ == "0.20.0", peft.__version__
        from peft import PeftModel
        from qpeft.tuners.qpa import export_lora
        from tests.contract import harness as h
        from tests.contract.test_qpa_contract import qpa
        for case in ["mlp", "gpt2"]:
            h.check_merge_equivalence(case, qpa(case))
            h.check_multiple_adapters(case, qpa(case), qpa(case, r=3))
            model, _ = h.wrap(case, qpa(case))
            h.train_steps(model, case)
            expected = h.run(model, case)
            out = {str(tmp_path)!r} + "/" + case
            model.save_pretrained(out)
            assert torch.equal(h.run(PeftModel.from_pretrained(h.build_tiny(case), out), case),
                               expected)
            export_lora(out, out + "-lora")
            lora = PeftModel.from_pretrained(h.build_tiny(case), out + "-lora")
            torch.testing.assert_close(h.run(lora, case), expected, atol=1e-6, rtol=1e-6)
            print(case, "ok")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpt2 ok" in proc.stdout


def test_half_precision_bases():
    # bf16 base: the generator is built in float32 and the delta is cast to the layer's dtype
    model, base_out = h.wrap("mlp", QPAConfig(r=2, n_mlp=64, target_modules=["lin0", "lin1"]),
                             dtype=torch.bfloat16)
    assert model.base_model.generator().theta.dtype == torch.float32
    # the offset start's two halves cancel in the bf16 token path to bf16 round-off of each
    # half (~2**-8 of g0·|B0 A0 x|, 5e-5 here with g0 = 0.3): far below one bf16 step of the
    # outputs' size, visible only on outputs near 0; the zero start is exact
    torch.testing.assert_close(h.run(model, "mlp", torch.bfloat16), base_out, atol=1e-4,
                               rtol=2**-7)
    zero_start, zero_base_out = h.wrap(
        "mlp", QPAConfig(r=2, n_mlp=64, target_modules=["lin0", "lin1"], init_gain=0.0),
        dtype=torch.bfloat16)
    assert torch.equal(h.run(zero_start, "mlp", torch.bfloat16), zero_base_out)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(**h.tiny_inputs("mlp", torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
    out = h.run(model, "mlp", torch.bfloat16)
    assert not torch.equal(out, base_out)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # casting the whole wrapped model afterwards: the circuit still runs (in float32)
    model.half()
    assert model.base_model.generator().theta.dtype == torch.float16
    out = h.run(model, "mlp", torch.float16)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_peft_autocast_adapter_dtype(dtype, autocast):
    """peft's contract (issue 13): with autocast_adapter_dtype=False the adapter keeps the base
    model's half dtype, with True (the default) it is upcast to float32."""
    torch.manual_seed(0)
    cfg = QPAConfig(r=2, n_mlp=64, target_modules=["a", "d"])
    model = get_peft_model(Stack().to(dtype), cfg, autocast_adapter_dtype=autocast)
    expected = torch.float32 if autocast else dtype
    params = [p for n, p in model.named_parameters() if "qpa_" in n]
    assert params and all(p.dtype == expected for p in params)


def test_init_weights_false_starts_from_a_random_delta_and_true_from_the_base_model():
    x = torch.randn(5, 64)
    torch.manual_seed(0)  # stack_model's seed: the same base weights
    reference = Stack()(x)
    # the zero start (init_gain=0) is the base model bit for bit; the offset start (default)
    # to round-off (tests/tuners/qpa/test_offset_start.py checks it to 1e-12 in float64)
    identity = stack_model(init_weights=True, init_gain=0.0).eval()
    offset_identity = stack_model(init_weights=True).eval()
    random_start = stack_model(init_weights=False).eval()
    torch.testing.assert_close(identity(x), reference, rtol=0, atol=0)
    torch.testing.assert_close(offset_identity(x), reference, rtol=0, atol=1e-6)
    # the offset start's random start: the gain at init_gain, phi0 an independent draw
    assert random_start.base_model.generator().gain.item() == pytest.approx(
        random_start.peft_config["default"].init_gain)
    assert (random_start(x) - reference).abs().max() > 1e-3
    zero_random_start = stack_model(init_weights=False, init_gain=0.0).eval()
    assert zero_random_start.base_model.generator().gain.item() == 1.0
    assert (zero_random_start(x) - reference).abs().max() > 1e-3
    # the same trainable count either way: init_weights only sets the gain's starting value
    assert sum(p.numel() for p in identity.parameters() if p.requires_grad) == sum(
        p.numel() for p in random_start.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("bias", ["all", "qpa_only"])
def test_bias_modes_train_the_biases_like_lora(bias):
    """bias="all" trains every bias of the model, "qpa_only" those of the adapted layers (as
    LoRA's "all" / "lora_only"); a second adapter with a bias mode is refused like LoRA."""
    torch.manual_seed(0)
    model = get_peft_model(Stack(), QPAConfig(r=2, n_mlp=64, target_modules=["a"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.a.base_layer.bias" in trainable
    assert ("base_model.model.b.bias" in trainable) == (bias == "all")
    assert not any(n.endswith("weight") and "qpa_" not in n for n in trainable)
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        model.add_adapter("other", QPAConfig(r=2, n_mlp=64, target_modules=["a"], bias=bias))


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_adapters_keeps_each_generators_trainability(is_trainable, tmp_path):
    """peft's rule (issue 13, peft's TestRequiresGrad): adding an adapter keeps the trainability of
    the existing ones, and load_adapter(is_trainable=True) makes the new one trainable — also
    for QPA's generators, which live on the tuner, outside the layers peft looks at."""
    torch.manual_seed(0)
    cfg = QPAConfig(r=2, n_mlp=64, target_modules=["a"])
    get_peft_model(Stack(), cfg).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(Stack(), tmp_path, is_trainable=is_trainable)
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    model.load_adapter(tmp_path, adapter_name="opposite", is_trainable=not is_trainable)
    tuner = model.base_model
    expected = {"default": is_trainable, "other": is_trainable, "opposite": not is_trainable}
    for name, trainable in expected.items():
        flags = {p.requires_grad for p in tuner.generator(name).parameters()}
        assert flags == {trainable}, name
    assert not any(p.requires_grad for n, p in model.named_parameters() if "qpa_" not in n)


def test_one_layer_class_per_kind_and_the_group_is_the_tuners_generator():
    """peft's layer shape: QPALinear for Linear / Conv1D, QPAConv2d for Conv2d (both QPALayer);
    every layer's group is the tuner's generator, reached through the unregistered
    ``qpa_group`` (no generator parameter appears under a layer)."""
    torch.manual_seed(0)

    model = get_peft_model(h.ConvThenLinear(), QPAConfig(target_modules=["conv", "lin"], r=2, n_mlp=16))
    inner = model.base_model.model
    assert type(inner.conv) is QPAConv2d and type(inner.lin) is QPALinear
    gen = model.base_model.generator()
    assert inner.conv.qpa_group["default"] is gen and inner.lin.qpa_group["default"] is gen
    assert [inner.conv.qpa_index["default"], inner.lin.qpa_index["default"]] == [0, 1]
    assert not any("theta" in n or "mlp" in n for n, _ in inner.named_parameters())
    with pytest.raises(ValueError, match="QPALinear wraps"):
        QPALinear(nn.Conv2d(3, 8, 2), "default", QPAConfig(target_modules=["x"]))
    with pytest.raises(ValueError, match="QPAConv2d wraps"):
        QPAConv2d(nn.Linear(8, 8), "default", QPAConfig(target_modules=["x"]))


# ------------------------------------------------------------------------------------------
# evaluation: every layer's factors kept per generator, checked once per forward


def _two_adapter_stack(gain: float = 0.5):
    """:func:`stack_model` with adapters "default" and "other" (different seeds), gains set so
    both change the output, eval mode."""
    model = stack_model(init_seed=1)
    model.add_adapter("other", QPAConfig(target_modules=["a", "b", "c", "d"], r=3, n_mlp=100,
                                         init_seed=2))
    with torch.no_grad():
        for gen in model.base_model.qpa_generator.values():
            gen.gain.fill_(gain)
    return model.eval()


def _rows_one_by_one(model, x, routing):
    rows = []
    for i, name in enumerate(routing):
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(x[i:i + 1]))
            else:
                model.set_adapter(name)
                rows.append(model(x[i:i + 1]))
    return torch.cat(rows)


def _fresh_copy_outputs(model, x, routing):
    """The same rows through a new model built from ``model``'s state (nothing kept)."""
    fresh = _two_adapter_stack()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        return fresh(x, adapter_names=routing)


@pytest.mark.parametrize("write", ["data", "copy_", "load_state_dict", "assign_data"])
def test_eval_sees_every_kind_of_parameter_write_between_forwards(write):
    """Kept factors must never be served stale: each kind of write between two mixed-batch
    forwards changes the output to exactly what a model built from the new state gives."""
    model = _two_adapter_stack()
    x = torch.randn(4, 64)
    routing = ["default", "other", "__base__", "default"]
    with torch.no_grad():
        first = model(x, adapter_names=routing)
        assert torch.equal(model(x, adapter_names=routing), first)
    gen = model.base_model.generator("default")
    weight = gen.mlp_weight_0
    if write == "data":
        weight.data.add_(0.25)  # no version counter bump
    elif write == "copy_":
        with torch.no_grad():
            weight.copy_(weight + 0.25)
    elif write == "load_state_dict":
        state = {k: v + 0.25 if k == "mlp_weight_0" else v for k, v in gen.state_dict().items()}
        gen.load_state_dict(state)
    else:
        weight.data = weight.data + 0.25  # new storage
    with torch.no_grad():
        changed = model(x, adapter_names=routing)
    assert (changed[[0, 3]] - first[[0, 3]]).abs().max() > 1e-4
    assert torch.equal(changed[[1, 2]], first[[1, 2]])
    assert torch.equal(changed, _fresh_copy_outputs(model, x, routing))


def test_a_mixed_batch_checks_each_generator_once_per_forward(monkeypatch):
    """The reuse check (a comparison by value of the generator's parameters) runs once per
    adapter and forward, not once per layer: O(adapters), not O(layers x adapters)."""
    import qpeft.tuners.qpa.generator as generator_module

    model = _two_adapter_stack()
    x = torch.randn(4, 64)
    routing = ["default", "other", "other", "default"]
    with torch.no_grad():
        expected = model(x, adapter_names=routing)
    compared = []
    real = generator_module.same_values
    monkeypatch.setattr(generator_module, "same_values",
                        lambda *a: (compared.append(1), real(*a))[1])
    with torch.no_grad():
        for forward in range(1, 4):
            assert torch.equal(model(x, adapter_names=routing), expected)
            assert len(compared) == 2 * forward  # 2 adapters, 4 layers each
        # outside a PeftModel forward (the wrapped model called directly) every read compares
        model.base_model.model(x)
    assert len(compared) == 6 + 4  # the active adapter "default", 4 layers


def test_hotswap_then_mixed_batch_equals_row_by_row(tmp_path):
    """A hot-swap writes the generator's tensors in place: the next mixed batch serves the new
    adapter, row for row what set_adapter gives, and what a model built with it gives."""
    from qpeft.hotswap import hotswap_adapter

    model = _two_adapter_stack()
    x = torch.randn(5, 64)
    routing = ["default", "other", "__base__", "other", "default"]
    with torch.no_grad():
        before = model(x, adapter_names=routing)
    donor = stack_model(init_seed=7)
    with torch.no_grad():
        donor.base_model.generator().gain.fill_(0.3)
    donor.save_pretrained(tmp_path)
    hotswap_adapter(model, str(tmp_path), adapter_name="other")
    with torch.no_grad():
        after = model(x, adapter_names=routing)
    assert (after[[1, 3]] - before[[1, 3]]).abs().max() > 1e-4
    assert torch.equal(after[[0, 2, 4]], before[[0, 2, 4]])
    # (a batch of one row multiplies in another order than a batch of five: round-off only)
    torch.testing.assert_close(after, _rows_one_by_one(model, x, routing), atol=1e-5, rtol=1e-5)
    assert torch.equal(after, _fresh_copy_outputs(model, x, routing))
    donor.eval()
    with torch.no_grad():
        torch.testing.assert_close(after[[1, 3]], donor(x[[1, 3]]), atol=1e-5, rtol=1e-5)


def test_eval_after_training_steps_serves_the_trained_factors():
    """Optimizer steps between evaluation forwards (train / eval toggled as a training loop
    with validation does): each evaluation gives the trained adapter's output."""
    model = _two_adapter_stack()
    x = torch.randn(4, 64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    outputs = []
    for _ in range(3):
        model.train()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            outputs.append(model(x))
            assert torch.equal(outputs[-1], _fresh_copy_outputs(model, x, ["default"] * 4))
    assert (outputs[1] - outputs[0]).abs().max() > 1e-6


def test_kept_factors_are_bit_for_bit_those_generated_per_layer():
    """The kept factors (one pass over all layers) are exactly each layer's own generation, so
    evaluation, merging in training mode and training-mode no-grad forwards agree bitwise."""
    for kw in ({}, {"preset": "reference"}, {"mlp_activation": "tanh", "center_output": True}):
        gen = stack_model(init_seed=3, **kw).base_model.generator()
        with torch.no_grad():
            gen.gain.fill_(0.5) if gen.gain is not None else None
            for index in range(len(gen.shapes)):
                kept_b, kept_a = gen.kept_factors(index)
                own_b, own_a = gen.factors(index)
                assert torch.equal(kept_b, own_b) and torch.equal(kept_a, own_a)
    model = _two_adapter_stack()
    x = torch.randn(3, 64)
    with torch.no_grad():
        evaluated = model(x)
        model.train()
        assert torch.equal(model(x), evaluated)
        model.merge_adapter()
        merged = model(x)
        model.unmerge_adapter()  # W + ΔW − ΔW: round-off only
        model.eval()
        torch.testing.assert_close(model(x), evaluated, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged, evaluated, atol=1e-5, rtol=1e-5)


def test_a_deep_copy_keeps_nothing_and_serves_its_own_parameters():
    import copy

    model = _two_adapter_stack()
    x = torch.randn(2, 64)
    with torch.no_grad():
        first = model(x)
    twin = copy.deepcopy(model)
    assert twin.base_model.generator()._kept.entry is None
    twin.base_model.generator().mlp_bias_0.data.add_(0.5)
    with torch.no_grad():
        assert torch.equal(model(x), first)
        assert (twin(x) - first).abs().max() > 1e-4


@pytest.mark.parametrize("gain", [0.0, 0.7])
@pytest.mark.parametrize("n_mlp", [100, 231])
def test_output_layer_and_gain_node_matches_autograd_and_keeps_no_rows(gain, n_mlp):
    """The output layer + gain node (it recomputes the rows in its backward) against autograd
    through the plain product, in float64: values and every parameter's gradient, at the zero
    start (g = 0: the MLP's gradient is zero, the gain's is not) and away from it, with a
    partly used last chunk (n_mlp = 100) and exactly full chunks (231: m = 462). What it keeps
    for the backward: nothing as large as the m generated numbers, which the plain product
    keeps for the gain's gradient."""
    gen = QPAGenerator([(16, 24), (40, 8), (8, 8), (33, 17)], r=3, n_mlp=n_mlp, depth=2,
                       hidden=(5, 7), init_seed=3).double()
    with torch.no_grad():
        gen.gain.fill_(gain)
    params = tuple(p.detach().clone().requires_grad_() for p in gen._shared_params())
    cotangent = torch.randn(gen.m // 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def plain(ps):
        return gen._generate_from(ps).view(-1, 3) * torch.where(gen.b_rows, ps[-1], 1.0)

    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = gen._rows_from(params)
    assert gen.m not in sizes and gen.n_chunks * n_mlp not in sizes
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        want = plain(params)
    assert gen.m in sizes  # the plain product keeps the rows
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    got_grads = torch.autograd.grad((got * cotangent).sum(), params)
    want_grads = torch.autograd.grad((want * cotangent).sum(), params)
    for g1, g2 in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)
    assert got_grads[-1].abs().item() > 0
