"""MiniLM load + forward, batching helpers, Fashion-MNIST IDX reading (synthetic files, and the
real data when present), SmolLM2 conversion cache (slow)."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import time

import pytest
import torch

from qpeft.assets import (
    MODEL_NAMES,
    AssetError,
    cache_dir,
    find_fashion_mnist,
    image_batch,
    lm_blocks,
    load_model,
    load_task,
    text_batch,
)

# ----------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return load_model("minilm", num_labels=5)


def test_minilm_forward(minilm):
    assert minilm.kind == "text-classification" and minilm.name == "minilm"
    assert minilm.default_target_modules == ["query", "value"]
    assert minilm.modules_to_save == ["classifier"]
    names = {n.split(".")[-1] for n, _ in minilm.model.named_modules()}
    assert {"query", "value", "classifier"} <= names
    assert sum(p.numel() for p in minilm.model.parameters()) == 22_713_216 + 384 * 5 + 5
    batch = text_batch(minilm.tokenizer, [{"text": "Shares rose sharply.", "label": 0},
                                          {"text": "The striker scored twice " * 50, "label": 3}],
                       max_length=32)
    assert batch["input_ids"].shape == (2, 32) and batch["labels"].tolist() == [0, 3]
    minilm.model.eval()
    with torch.no_grad():
        out = minilm.model(**batch)
    assert out.logits.shape == (2, 5) and torch.isfinite(out.loss)


def test_minilm_requires_num_labels():
    with pytest.raises(ValueError, match="num_labels is required"):
        load_model("minilm")


def test_load_model_bad_name_and_dtype():
    with pytest.raises(ValueError, match="minilm"):
        load_model("gpt2")
    with pytest.raises(ValueError, match="dtype"):
        load_model("efficientnet-lite0", dtype=torch.int8)
    assert MODEL_NAMES == ("minilm", "smollm2", "efficientnet-lite0")


def test_text_batch_rejects_bad_input(minilm):
    with pytest.raises(ValueError, match="max_length"):
        text_batch(minilm.tokenizer, [{"text": "a", "label": 0}], max_length=0)
    with pytest.raises(ValueError, match="empty"):
        text_batch(minilm.tokenizer, [], max_length=8)


# ----------------------------------------------------------------- lm_blocks / image_batch


class CharTokenizer:
    """One token per character (ord), EOS = 0: enough to check the chunking exactly."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_lm_blocks_exact():
    tok = CharTokenizer()
    blocks = lm_blocks(tok, ["abc", "de", "fghij"], block_size=4)
    stream = [97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106, 0]
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    assert lm_blocks(tok, ["abc", "de", "fghij"], 4, max_blocks=2).tolist() == [
        stream[0:4], stream[4:8]]
    with pytest.raises(ValueError, match="block_size=64"):
        lm_blocks(tok, ["short"], 64)
    with pytest.raises(ValueError, match="block_size"):
        lm_blocks(tok, ["short"], 1)
    with pytest.raises(ValueError, match="max_blocks"):
        lm_blocks(tok, ["short"], 2, max_blocks=0)


def test_image_batch():
    imgs = torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8)  # [1,1,2,2]
    out = image_batch(imgs, 2)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    expected = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])
    for c in range(3):
        torch.testing.assert_close(out[0, c], expected)
    big = image_batch(torch.full((4, 1, 28, 28), 255, dtype=torch.uint8), 32)
    assert big.shape == (4, 3, 32, 32) and torch.allclose(big, torch.ones_like(big))
    torch.testing.assert_close(image_batch(imgs.float() / 255, 2), out)
    torch.testing.assert_close(image_batch(imgs[:, 0], 2), out)  # [B, H, W] accepted
    with pytest.raises(ValueError, match="image_size"):
        image_batch(imgs, 0)
    with pytest.raises(ValueError, match="shape"):
        image_batch(torch.zeros(1, 2, 4, 4), 4)
    with pytest.raises(ValueError, match="uint8 or floating"):
        image_batch(torch.zeros(1, 1, 4, 4, dtype=torch.int32), 4)


# ----------------------------------------------------------------- Fashion-MNIST


def _write_idx(path, array: torch.Tensor):
    header = struct.pack(">HBB", 0, 8, array.dim()) + struct.pack(
        f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(array.flatten().tolist()))


def test_fashion_mnist_from_synthetic_idx(tmp_path, monkeypatch):
    d = tmp_path / "nested" / "fm"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tr_y = torch.arange(10).repeat(6)  # 60 images, 6 per class
    ev_y = torch.arange(10).repeat(2)
    tr_x = torch.randint(0, 256, (60, 28, 28), generator=g, dtype=torch.uint8)
    tr_x[:, 0, 0] = tr_y.to(torch.uint8)  # tag pixel = label: checks images stay with labels
    ev_x = torch.randint(0, 256, (20, 28, 28), generator=g, dtype=torch.uint8)
    _write_idx(d / "train-images-idx3-ubyte.gz", tr_x)
    _write_idx(d / "train-labels-idx1-ubyte.gz", tr_y.to(torch.uint8))
    _write_idx(d / "t10k-images-idx3-ubyte.gz", ev_x)
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", ev_y.to(torch.uint8))
    monkeypatch.setenv("QPEFT_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert find_fashion_mnist()["train_images"] == d / "train-images-idx3-ubyte.gz"
    task = load_task("fashion-mnist", max_train=20, max_eval=10, seed=1)
    assert task.kind == "image-classification" and task.num_labels == 10
    assert task.train.images.shape == (20, 1, 28, 28) and task.train.images.dtype == torch.uint8
    assert task.train.labels.dtype == torch.long and len(task.train) == 20
    assert task.split["train_class_counts"] == [2] * 10
    assert task.split["eval_class_counts"] == [1] * 10
    assert torch.equal(task.train.images[:, 0, 0, 0].long(), task.train.labels)
    full = load_task("fashion-mnist")
    assert len(full.train) == 60 and len(full.eval) == 20
    assert sorted(full.train.labels.tolist()) == sorted(tr_y.tolist())


def test_fashion_mnist_bad_idx(tmp_path, monkeypatch):
    d = tmp_path / "fm"
    d.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / name).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")  # says 5 bytes, has 2
    monkeypatch.setenv("QPEFT_FASHION_MNIST_DIR", str(d))
    monkeypatch.chdir(tmp_path)
    if find_fashion_mnist()["train_images"].parent != d:
        pytest.skip("a real Fashion-MNIST copy is found first")
    with pytest.raises(AssetError, match="expected 5 bytes"):
        load_task("fashion-mnist")


@pytest.mark.slow
def test_fashion_mnist_real():
    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST IDX files unavailable: run "
                    "`bash scripts/fetch_fashion_mnist.sh .assets/fashion-mnist`")
    task = load_task("fashion-mnist")
    assert (len(task.train), len(task.eval)) == (60000, 10000)
    assert task.split["strategy"] == "official"
    assert task.split["train_class_counts"] == [6000] * 10
    assert task.split["eval_class_counts"] == [1000] * 10
    assert task.train.images.shape == (60000, 1, 28, 28)
    small = load_task("fashion-mnist", max_train=100, max_eval=50)
    assert small.split["train_class_counts"] == [10] * 10
    assert small.split["eval_class_counts"] == [5] * 10


# ----------------------------------------------------------------- cache dir / SmolLM2


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QPEFT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QPEFT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "qpeft"


_SMOL_SCRIPT = """
import json, time, torch
t = time.perf_counter()
from qpeft.assets import load_model, lm_blocks
lm = load_model("smollm2")
seconds = time.perf_counter() - t
ids = lm_blocks(lm.tokenizer, ["To be, or not to be, that is the question."] * 4, 16, 2)
with torch.no_grad():
    loss = lm.model(input_ids=ids, labels=ids).loss.item()
print(json.dumps({"seconds": seconds, "loss": loss, "pad": lm.tokenizer.pad_token,
                  "params": sum(p.numel() for p in lm.model.parameters()),
                  "kind": lm.kind, "targets": lm.default_target_modules}))
"""


@pytest.mark.slow
def test_smollm2_convert_then_cached(tmp_path):
    import json

    env = dict(os.environ, QPEFT_CACHE_DIR=str(tmp_path), HF_HUB_OFFLINE="1")

    def run():
        out = subprocess.run([sys.executable, "-c", _SMOL_SCRIPT], env=env, check=True,
                             capture_output=True, text=True, timeout=900)
        return json.loads(out.stdout.strip().splitlines()[-1])

    t0 = time.perf_counter()
    first = run()
    first_wall = time.perf_counter() - t0
    folder = tmp_path / "smollm2-135m-fp32"
    assert (folder / "qpeft-cache.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left
    second = run()
    assert second["seconds"] < first["seconds"] / 2, (first, second, first_wall)
    assert second["loss"] == pytest.approx(first["loss"], abs=1e-5)
    assert first["params"] == 134_515_008 and first["kind"] == "causal-lm"
    assert first["targets"] == ["q_proj", "v_proj"] and first["pad"] is not None
    assert 0 < first["loss"] < 10
