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
from torch.utils._python_dispatch import TorchDispatchMode

from .llm import (
    METHODS,
    assert_same,
    batch,
    loss_and_grads,
    method_config,
    row_by_row,
    tiny_llama,
)

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


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_float32_on_the_gpu_matches_the_cpu(method: str) -> None:
    model = get_peft_model(tiny_llama(), method_config(method)).train()
    inputs = batch()
    on_cpu = loss_and_grads(model, inputs)
    gpu_model = copy.deepcopy(model).to(CUDA)
    on_gpu = loss_and_grads(gpu_model, _on(inputs, CUDA))
    assert_same(on_cpu, on_gpu, tol=1e-4)
    # a second step on the GPU (the shared generation of the first is not reused)
    assert_same(on_gpu, loss_and_grads(gpu_model, _on(inputs, CUDA)), tol=1e-6)


@needs_cuda
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_on_the_gpu(method: str, reentrant: bool) -> None:
    model = get_peft_model(tiny_llama(), method_config(method)).to(CUDA).train()
    inputs = _on(batch(), CUDA)
    plain = loss_and_grads(model, inputs)
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    assert_same(plain, loss_and_grads(model, inputs), tol=1e-5)


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
    from qpeft.tuners._batched_generation import same_values

    params = [torch.randn(5, 3, device=CUDA), torch.randn(7, device=CUDA)]
    snapshot = [p.clone() for p in params]
    assert same_values(snapshot, params)
    params[1][6] += 1e-6
    assert not same_values(snapshot, params)
    assert not same_values(snapshot[:1], params)
    assert not same_values([snapshot[0].double(), snapshot[1]], params)


# ---- no host sync inside a training step ---------------------------------------------------------

#: operations that read a value on the host: on an accelerator each one waits for the device
READ_BACKS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero",
                        "_linalg_check_errors", "masked_select", "_unique2", "unique_consecutive",
                        "unique_dim"})


class _HostTraffic(TorchDispatchMode):
    """Records what would stall an accelerator's queue: read-backs (:data:`READ_BACKS`), and
    tensors made from host data with at least one dimension (``torch.tensor([...])``: a
    host-to-device copy there; 0-dim ones are not counted, as ``t[i] = 1.0`` makes one on the
    CPU only)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in READ_BACKS or (name == "lift_fresh" and out.dim() > 0 and out.numel() > 0):
            self.seen.append(str(func))
        return out


@pytest.fixture
def no_packed_sequence_check(monkeypatch):
    """transformers' own read-back: without a KV cache (gradient checkpointing turns it off)
    and without an attention mask, every forward checks the position ids for packed sequences
    on the host (``find_packed_sequence_indices``: ``.all()`` read back), whatever the adapter.
    Here it answers "not packed" (true of these batches) without reading anything."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)


def _step(model, ids: torch.Tensor) -> None:
    """Forward and backward with the loss computed here (no library code between)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()


def _accelerator_path(on: bool):
    from contextlib import nullcontext

    from qpeft.circuits._device import force_accelerator_path

    return force_accelerator_path() if on else nullcontext()


def _sync_free_config(variant: str):
    import qpeft

    if variant == "qpa-reference":  # the paper's MLP: no activation, centred output
        return qpeft.QPAConfig(r=4, target_modules=["q_proj", "v_proj"], preset="reference",
                               n_mlp=64, init_seed=1)
    if variant in ("quic-rbs", "quic-exp"):  # the other base maps (circuit, matrix exponential)
        return qpeft.QuICConfig(target_modules=["q_proj", "v_proj"], base_map=variant[5:],
                                num_blocks=2, init_weights=False)
    if variant == "quic-k3":
        return qpeft.QuICConfig(target_modules=["q_proj", "v_proj"], orders=[1, 2, 3],
                                num_blocks=1, init_weights=False)
    return method_config(variant)


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-path", "accelerator-path"])
@pytest.mark.parametrize("variant", [*METHODS, "quic-k3", "quic-rbs", "quic-exp",
                                     "qpa-reference"])
def test_a_training_step_reads_nothing_back(variant: str, accelerator: bool,
                                            checkpointing: str | None,
                                            no_packed_sequence_check) -> None:
    """Two micro-batches' forward and backward after a warm-up step: no operation that reads a
    value back to the host or copies host data to the device, on either path (the CPU's, and
    the accelerator's run on CPU tensors). peft LoRA is the control: it shows the model and
    the loss add none."""
    model = get_peft_model(tiny_llama(), _sync_free_config(variant)).train()
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    ids = batch()["input_ids"]
    with _accelerator_path(accelerator):
        _step(model, ids)  # warm-up: index tables are built once per device
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        with _HostTraffic() as traffic:
            _step(model, ids)
            model(input_ids=ids).logits.sum().backward()  # a second micro-batch
    assert traffic.seen == []


def test_host_traffic_is_seen() -> None:
    """The recorder above catches what it looks for."""
    x = torch.randn(3)
    with _HostTraffic() as traffic:
        _ = x.sum().item(), torch.equal(x, x), bool(x[0] > 0), torch.tensor([1.0, 2.0])
    assert len(traffic.seen) == 4, traffic.seen


@pytest.mark.parametrize("variant", ["quic", "quic-k3"])
def test_the_accelerator_path_on_the_cpu_gives_the_cpu_step(variant: str, monkeypatch) -> None:
    """``force_accelerator_path`` switches QuIC's kernels (other operations are dispatched),
    not its values: the same loss and gradients. The orders above 1 take their action (on
    these small blocks both cost models form them explicitly, with the same kernels)."""
    import qpeft.circuits.compound_rotation as rotation

    real_costs = rotation.order_costs

    def action_costs(op, tokens, n_blocks):
        costs = real_costs(op, tokens, n_blocks)
        return {**costs, "action": 0} if "action" in costs else costs

    monkeypatch.setattr(rotation, "order_costs", action_costs)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    model = get_peft_model(tiny_llama(), _sync_free_config(variant)).train()
    inputs = {"input_ids": batch(rows=3, length=40)["input_ids"]}
    inputs["labels"] = inputs["input_ids"]
    runs = []
    for accelerator in (False, True):
        with _accelerator_path(accelerator):
            loss_and_grads(model, inputs)  # warm-up: index tables are built once
            with Count() as count:
                runs.append((loss_and_grads(model, inputs), count.n))
    (cpu, n_cpu), (acc, n_acc) = runs
    assert_same(cpu, acc, tol=1e-5)
    assert n_cpu != n_acc, "the accelerator path ran other kernels"


@needs_cuda
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
@pytest.mark.parametrize("variant", [*METHODS, "quic-k3", "quic-rbs", "quic-exp",
                                     "qpa-reference"])
def test_a_training_step_on_the_gpu_never_syncs(variant: str, checkpointing: str | None,
                                                no_packed_sequence_check) -> None:
    """The issue's check: forward and backward under ``torch.cuda.set_sync_debug_mode("error")``
    after a warm-up step (which builds and copies the index tables once). peft LoRA is the
    control. QuIC's ``exp`` base map runs ``torch.linalg.matrix_exp``, whose CUDA forward may
    read the matrices' norms back to pick its degree: if it does, that case fails here, a sync
    inside torch that only an exponential of qpeft's own would remove."""
    model = get_peft_model(tiny_llama(), _sync_free_config(variant)).to(CUDA).train()
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    ids = batch()["input_ids"].to(CUDA)
    _step(model, ids)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, ids)
        _step(model, ids)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
