"""EfficientNet-Lite0: TF "same" padding vs explicit padding, strict load of the shipped weights,
parameter count, forwards at 224 and 32 px, new head, peft targeting of the 1x1 convs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qpeft.assets import EfficientNetLite0, efficientnet_lite0_num_params, image_batch, load_model
from qpeft.assets.efficientnet import SameConv2d, block_specs, same_padding
from qpeft.assets.models import efficientnet_state_dict


@pytest.mark.parametrize("size", [1, 2, 7, 8, 28, 31, 32, 224, 225])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (5, 1), (5, 2), (1, 1)])
def test_same_padding_output_size(size, kernel, stride):
    before, after = same_padding(size, kernel, stride)
    assert 0 <= before <= after <= before + 1
    out = (size + before + after - kernel) // stride + 1
    assert out == math.ceil(size / stride)


def test_same_conv_matches_explicit_padding():
    torch.manual_seed(0)
    for k, s, groups in [(3, 2, 1), (5, 2, 4), (3, 1, 4), (5, 1, 1)]:
        conv = SameConv2d(4, 4, k, stride=s, groups=groups, bias=False).double()
        for h, w in [(9, 10), (16, 16), (7, 5)]:
            x = torch.randn(2, 4, h, w, dtype=torch.float64)
            ph, pw = same_padding(h, k, s), same_padding(w, k, s)
            ref = F.conv2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1])), conv.weight, None, s,
                           groups=groups)
            torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-12)
            assert conv(x).shape[-2:] == (math.ceil(h / s), math.ceil(w / s))
    # stride 1, odd kernel: TF "same" is PyTorch's symmetric padding
    sym = nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
    same = SameConv2d(4, 4, 3, bias=False).double()
    same.weight.data.copy_(sym.weight.data)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(same(x), sym(x), rtol=0, atol=1e-12)


def test_block_table_unrolled():
    specs = block_specs()
    assert len(specs) == 16
    assert specs[0] == (32, 16, 3, 1, 1)
    assert specs[-1] == (192, 320, 3, 1, 6)
    assert sum(1 for s in specs if s[3] == 2) == 4  # 224 -> 112 (stem) -> 7


@pytest.fixture(scope="module")
def shipped():
    model = EfficientNetLite0()
    missing = model.load_state_dict(efficientnet_state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return model.eval()


def test_strict_load_and_param_count(shipped):
    sd = efficientnet_state_dict()
    assert len(sd) == 296
    assert set(sd) == set(shipped.state_dict())
    n = sum(p.numel() for p in shipped.parameters())
    assert n == efficientnet_lite0_num_params(1000) == 4_652_008
    assert efficientnet_lite0_num_params(10) == n - 1280 * 990 - 990
    assert shipped._bn0.eps == 1e-3


def test_forward_shipped_weights_synthetic_image(shipped):
    # a smooth synthetic colour image (gradients + a disc), uint8
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    disc = (((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.1).float()
    img = torch.stack([xx, yy, disc]).mul(255).round().to(torch.uint8)[None]
    x = image_batch(img, 224)
    with torch.no_grad():
        logits = shipped(x)
        small = shipped(image_batch(img, 32))
    assert logits.shape == (1, 1000) and small.shape == (1, 1000)
    assert torch.isfinite(logits).all() and torch.isfinite(small).all()
    p = logits.softmax(-1)
    assert p.max() < 0.999  # not a degenerate one-hot from exploding activations
    # eval mode is deterministic; train mode (dropout) is not the same computation
    with torch.no_grad():
        torch.testing.assert_close(shipped(x), logits)


def test_chelsea_is_a_cat(shipped):
    data = pytest.importorskip("skimage.data", reason="scikit-image not installed (optional)")
    img = torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1)[None]  # uint8 [1,3,H,W]
    with torch.no_grad():
        top5 = shipped(image_batch(img, 224)).topk(5).indices[0].tolist()
    assert 285 in top5  # ImageNet "Egyptian cat"


def test_load_model_new_head_seeded():
    torch.manual_seed(0)
    a = load_model("efficientnet-lite0", num_labels=10)
    torch.manual_seed(0)
    b = load_model("efficientnet-lite0", num_labels=10)
    assert a.kind == "image-classification" and a.image_size == 224 and a.tokenizer is None
    assert a.modules_to_save == ["_fc"]
    assert a.model._fc.out_features == 10
    torch.testing.assert_close(a.model._fc.weight, b.model._fc.weight)
    ref = efficientnet_state_dict()
    torch.testing.assert_close(a.model._conv_head.weight, ref["_conv_head.weight"])
    same = load_model("efficientnet-lite0")
    assert same.modules_to_save is None and same.model._fc.out_features == 1000
    torch.testing.assert_close(same.model._fc.weight, ref["_fc.weight"])
    half = load_model("efficientnet-lite0", dtype=torch.bfloat16)
    assert half.model._fc.weight.dtype == torch.bfloat16


def test_default_targets_are_peft_matchable_1x1_convs():
    from peft import LoraConfig, get_peft_model

    lm = load_model("efficientnet-lite0", num_labels=3)
    hits = [n for n, m in lm.model.named_modules()
            if n.split(".")[-1] in lm.default_target_modules]
    assert len(hits) == 15 + 16  # expand convs of blocks 1..15, project convs of all 16
    for n in hits:
        m = lm.model.get_submodule(n)
        assert type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.groups == 1
    cfg = LoraConfig(r=2, target_modules=lm.default_target_modules,
                     modules_to_save=lm.modules_to_save)
    peft_model = get_peft_model(lm.model, cfg)
    peft_model.eval()
    x = image_batch(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 32)
    assert peft_model(x).shape == (2, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        EfficientNetLite0(num_classes=0)
    with pytest.raises(ValueError, match="dropout"):
        EfficientNetLite0(dropout=1.5)
    with pytest.raises(ValueError, match="num_labels"):
        load_model("efficientnet-lite0", num_labels=0)
    with pytest.raises(ValueError, match="images must have shape"):
        EfficientNetLite0().features(torch.zeros(1, 1, 32, 32))
