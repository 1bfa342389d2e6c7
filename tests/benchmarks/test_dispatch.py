"""Smoke test of ``benchmarks/dispatch.py`` on a 2-layer model: the counts it writes and the
invariants they obey (no wall-clock anywhere: operations are counted, exactly)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import dispatch, report
from benchmarks import models as M


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp("dispatch")
    dispatch.run(quick=True, out_dir=out)
    return json.loads((out / "dispatch.json").read_text()), out


def test_counter_sees_every_operation_and_views_apart() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with dispatch.OpCounter() as counter:
        (a @ b).t().sum().item()
        a.t().reshape(12)  # a copy (not contiguous), then metadata for its new shape
    assert counter.ops == {"mm": 1, "t": 2, "sum": 1, "_local_scalar_dense": 1, "clone": 1,
                           "_unsafe_view": 1}
    assert counter.views == 3 and counter.syncs == {"_local_scalar_dense": 1}


def test_quick_counts(quick_result) -> None:
    result, out = quick_result
    assert result["layers"] == [2] and result["paths"] == ["cpu", "accelerator"]
    for path in result["paths"]:
        block = result["runs"][f"{path}/2"]
        assert list(block) == list(dispatch.METHODS)
        for method, row in block.items():
            assert 0 < row["views"] < row["ops"] and row["kernels"] == row["ops"] - row["views"]
            assert row["syncs"] == {}, (path, method)  # no read-back in any method's step
            assert row["ops_over_lora"] == row["ops"] / block["lora"]["ops"]
        assert block["lora"]["ops"] < block["oft"]["ops"]
        assert block["lora"]["ops"] < min(block[m]["ops"] for m in M.QPEFT_METHODS)
    cpu, acc = result["runs"]["cpu/2"], result["runs"]["accelerator/2"]
    # only QuIC picks kernels by device, and on these small blocks both its cost models form
    # every order (its accelerator kernels: tests/ecosystem/test_devices.py): the same counts
    for method in dispatch.METHODS:
        assert cpu[method]["ops"] == acc[method]["ops"], method
    assert (out / "dispatch.md").read_text().startswith("**cpu path**")


def test_counts_repeat_exactly() -> None:
    first = dispatch.measure(2, "cpu", methods=("lora",))["lora"]
    again = dispatch.measure(2, "cpu", methods=("lora",))["lora"]
    assert first["ops"] == again["ops"] and first["top"] == again["top"]


def test_targets_and_report_section(quick_result, tmp_path) -> None:
    result, out = quick_result
    rows = dispatch.targets(result)
    assert len(rows) == 2 * len(result["paths"]) * len(M.QPEFT_METHODS) + len(result["saved"])
    assert all(isinstance(ok, bool) for *_, ok in rows)
    doc = report.write_doc(out, tmp_path / "benchmarks.md")
    text = doc.read_text()
    section = text[text.index("## 9. Operations dispatched per training step"):]
    assert "**accelerator path**" in section and "Most dispatched operations" in section
    assert "Activations saved for the backward" in section


def test_saved_activation_bytes_counts_what_autograd_keeps() -> None:
    """On a toy step whose saved tensors are known: the float copy of the input (kept by the
    matmul for the weight's gradient) and the matmul's output (kept by pow), 2 x 4 float32
    each; the trainable weight is the model's own and not counted."""
    from types import SimpleNamespace

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(loss=(input_ids.float() @ self.w).pow(2).sum())

    ids = torch.arange(8).view(2, 4)
    assert dispatch.saved_activation_bytes(Toy(), {"input_ids": ids, "labels": ids}) == 2 * 32


def test_saved_activation_bytes_counts_the_shared_generations_own_graph() -> None:
    """A generation shared through ``BatchedGeneration`` keeps its graph under hooks of its own:
    here ``exp`` keeps its 4 x 4 float32 output there (64 bytes), the outer matmul the float
    copy of the input (32 bytes); both are memory the step holds until its backward."""
    from types import SimpleNamespace

    from qpeft.tuners._batched_generation import BatchedGeneration

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.randn(4, 4))
            self.shared = BatchedGeneration(lambda params: [(ps[0].exp(),) for ps in params],
                                            lambda m, own: (own[0].exp(),), n_outputs=1)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
            (w,) = self.shared.outputs(0, (self.p,), lambda: [(self.p,)])
            return SimpleNamespace(loss=(input_ids.float() @ w).sum())

    ids = torch.arange(8).view(2, 4)
    assert dispatch.saved_activation_bytes(Toy(), {"input_ids": ids, "labels": ids}) == 32 + 64


def test_saved_profile(quick_result) -> None:
    """Every method's saved activations on both real-width shapes and both paths, as ratios to
    LoRA and OFT."""
    result, _ = quick_result
    assert list(result["saved"]) == [f"{shape}/{path}" for shape in dispatch.PROFILE_SHAPES
                                     for path in dispatch.PATHS]
    for shape in result["saved"].values():
        assert list(shape) == list(dispatch.METHODS)
        assert shape["lora"]["over_lora"] == 1.0 and shape["oft"]["over_oft"] == 1.0
        assert all(row["bytes"] > 0 and row["kernels"] > 0 for row in shape.values())
        assert shape["lora"]["kernels_over_lora"] == 1.0
