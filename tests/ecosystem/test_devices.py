"""Devices and precisions, with peft LoRA as the control on each: bfloat16 bases train (peft's
float32 adapters) and ``torch.autocast`` to bfloat16 trains, on the CPU and on a GPU; on a GPU, a
float32 model gives the CPU's loss and adapter gradients, and gradient checkpointing,
mixed-adapter batches and merging hold; an adapter saved from the GPU loads on the CPU. The GPU
tests are skipped where no GPU is present (CI has none); on a GPU machine run
``python -m pytest tests/ecosystem/test_devices.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from .llm import METHODS, adapter_grads, batch, method_config, row_by_row, tiny_llama

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """TF32 would put 1e-3 differences between the CPU and GPU runs."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _on(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def _loss_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach().cpu(), {n: g.cpu() for n, g in adapter_grads(model).items()}


def _assert_same(ref, got, tol: float) -> None:
    (loss_ref, grads_ref), (loss, grads) = ref, got
    torch.testing.assert_close(loss, loss_ref, atol=tol, rtol=tol)
    assert grads.keys() == grads_ref.keys() and grads, "every adapter tensor gets a gradient"
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=tol, rtol=tol, msg=name)


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_float32_on_the_gpu_matches_the_cpu(method: str) -> None:
    model = get_peft_model(tiny_llama(), method_config(method)).train()
    inputs = batch()
    on_cpu = _loss_and_grads(model, inputs)
    gpu_model = copy.deepcopy(model).to(CUDA)
    on_gpu = _loss_and_grads(gpu_model, _on(inputs, CUDA))
    _assert_same(on_cpu, on_gpu, tol=1e-4)
    # a second step on the GPU (the shared generation of the first is not reused)
    _assert_same(on_gpu, _loss_and_grads(gpu_model, _on(inputs, CUDA)), tol=1e-6)


@needs_cuda
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_on_the_gpu(method: str, reentrant: bool) -> None:
    model = get_peft_model(tiny_llama(), method_config(method)).to(CUDA).train()
    inputs = _on(batch(), CUDA)
    plain = _loss_and_grads(model, inputs)
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    _assert_same(plain, _loss_and_grads(model, inputs), tol=1e-5)


def _train(model, inputs, steps: int = 3, autocast: bool = False) -> list[float]:
    device = next(iter(inputs.values())).device.type
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True)), \
        "every adapter tensor moved"
    return losses


def _float32_run(method: str, device: str):
    """A float32 model on ``device`` in train mode, a batch there, and its float32 loss."""
    inputs = _on(batch(), torch.device(device))
    model = get_peft_model(tiny_llama(), method_config(method)).to(device).train()
    with torch.no_grad():
        loss32 = model(**inputs).loss.item()
    return model, inputs, loss32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_a_bfloat16_base_trains(method: str, device: str) -> None:
    """peft's default for a half-precision base: the adapter is kept in float32."""
    _, inputs, loss32 = _float32_run(method, device)
    model = get_peft_model(tiny_llama().to(device, torch.bfloat16), method_config(method)).train()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
    losses = _train(model, inputs)
    # the bf16 model starts where the fp32 one does (to bf16's precision)
    assert abs(losses[0] - loss32) < 2e-2 * abs(loss32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_autocast_bfloat16_trains_and_matches_float32(method: str, device: str) -> None:
    """The circuits run in float32 under autocast (their kernels' backward sees no bfloat16)."""
    model, inputs, loss32 = _float32_run(method, device)
    losses = _train(model, inputs, autocast=True)
    assert abs(losses[0] - loss32) < 2e-2 * abs(loss32)


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batch_on_the_gpu(method: str) -> None:
    model = get_peft_model(tiny_llama(), method_config(method, seed=0), adapter_name="a")
    model.add_adapter("b", method_config(method, seed=5))
    model = model.to(CUDA).eval()
    ids = batch(rows=4)["input_ids"].to(CUDA)
    names = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        expected = row_by_row(model, ids, names)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_merge_on_the_gpu(method: str) -> None:
    model = get_peft_model(tiny_llama(), method_config(method)).to(CUDA).eval()
    ids = batch()["input_ids"].to(CUDA)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_saved_from_the_gpu_loads_on_the_cpu(method: str, tmp_path) -> None:
    model = get_peft_model(tiny_llama(), method_config(method)).to(CUDA).eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids.to(CUDA)).logits.cpu()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("k", [2, 3])
def test_compound_action_on_the_gpu_equals_the_cpu(k: int) -> None:
    """The accelerator's order-k action (mode products) against the CPU kernel, float64."""
    from qpeft.circuits.compound import compound_apply

    g = torch.Generator().manual_seed(k)
    n, c = 11, {2: 55, 3: 165}[k]
    a = torch.randn(3, n, n, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 40, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 40, c, generator=g, dtype=torch.float64)
    ref = compound_apply(a, x, k)
    ref_grads = torch.autograd.grad((ref * w).sum(), (a, x))
    a_gpu, x_gpu = (t.detach().to(CUDA).requires_grad_() for t in (a, x))
    got = compound_apply(a_gpu, x_gpu, k)
    got_grads = torch.autograd.grad((got * w.to(CUDA)).sum(), (a_gpu, x_gpu))
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-10)
    for g_got, g_ref in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g_got.cpu(), g_ref, rtol=0, atol=1e-10)


@needs_cuda
def test_same_values_on_the_gpu_compares_every_tensor() -> None:
    """The one-sync comparison on an accelerator: any differing entry of any tensor counts."""
    from qpeft.tuners._shared import same_values

    params = [torch.randn(5, 3, device=CUDA), torch.randn(7, device=CUDA)]
    snapshot = [p.clone() for p in params]
    assert same_values(snapshot, params)
    params[1][6] += 1e-6
    assert not same_values(snapshot, params)
    assert not same_values(snapshot[:1], params)
    assert not same_values([snapshot[0].double(), snapshot[1]], params)
