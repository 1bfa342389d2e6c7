"""The peft contract every qpeft method must honour, as reusable checks on tiny CPU models.

Modelled on peft's custom-model tests. A method's test file parametrises these checks over
``TINY_MODELS`` and passes its own configs (one at the default, identity init; one at a random,
non-identity init). Every check builds its models from fixed seeds, so the base model of a case
is the same in every process (the save/load check relies on that).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]


class TinyMLP(nn.Module):
    """Linear layers of widths 16 -> 32 -> 24 -> 8 (one power-of-two side, one not)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 24)
        self.head = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class TinyCNN(nn.Module):
    """Two 3x3 convolutions (3 -> 8 -> 16 channels) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.head(h.mean(dim=(2, 3)))


@dataclass(frozen=True)
class TinyCase:
    """A tiny model, its inputs, and the modules adapters target."""

    name: str
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] | None = None


class ConvThenLinear(nn.Module):
    """A Conv2d (3 -> 8 channels, kernel 2) then a Linear (8 -> 8): one layer of each kind, for
    the per-kind layer classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 2)
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x).mean((2, 3)))


TINY_MODELS: dict[str, TinyCase] = {
    "mlp": TinyCase("mlp", ("lin0", "lin1")),
    "cnn": TinyCase("cnn", ("conv0", "conv1")),
    "bert": TinyCase("bert", ("query", "value"), ("classifier",)),
    "gpt2": TinyCase("gpt2", ("c_attn",)),  # transformers Conv1D, fused qkv 64 -> 192
}


def build_tiny(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model of case ``name``, random weights from a fixed seed, in eval mode."""
    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = TinyMLP()
    elif name == "cnn":
        model = TinyCNN()
    elif name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=3,
        )
        model = BertForSequenceClassification(cfg)
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_MODELS)}")
    return model.to(dtype).eval()


def tiny_inputs(name: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Fixed inputs for case ``name`` (keyword arguments of the model's forward)."""
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        return {"x": torch.randn(5, 16, generator=gen).to(dtype)}
    if name == "cnn":
        return {"x": torch.randn(2, 3, 6, 6, generator=gen).to(dtype)}
    ids = torch.randint(0, 100, (2, 7), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model: nn.Module, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The model's output tensor (logits for transformers models) on the case's inputs."""
    with torch.no_grad():
        out = model(**tiny_inputs(name, dtype))
    return out if isinstance(out, torch.Tensor) else out.logits


def wrap(name: str, config, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    """(peft model of case ``name`` with ``config``, the base model's output before wrapping)."""
    base = build_tiny(name, dtype)
    base_out = run(base, name, dtype)
    return get_peft_model(base, copy.deepcopy(config)), base_out


def _loss(model: nn.Module, name: str) -> torch.Tensor:
    out = model(**tiny_inputs(name))
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return (logits.float() ** 2).mean() + logits.float().mean()


def train_steps(model: nn.Module, name: str, steps: int = 2, lr: float = 1e-1) -> None:
    """A few plain optimizer steps on a fixed quadratic loss (moves every trainable tensor)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, name).backward()
        opt.step()
    model.eval()


# --------------------------------------------------------------------------------------------
# The checks. Each takes the case name and fresh config(s); each asserts.


def check_identity_at_init(name: str, config, exact: bool = True) -> None:
    """A freshly wrapped model gives the base model's outputs (bit for bit when ``exact``)."""
    model, base_out = wrap(name, config)
    out = run(model, name)
    if exact:
        assert torch.equal(out, base_out), f"max diff {(out - base_out).abs().max():.3e}"
    else:
        torch.testing.assert_close(out, base_out, atol=1e-6, rtol=0)


def check_only_adapter_params_change(name: str, config, prefix: str) -> None:
    """After optimizer steps, base weights are untouched; trainable tensors are the adapter's
    (names carry ``prefix``) or ``modules_to_save`` copies; and at least one of them moved."""
    model, _ = wrap(name, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "no trainable parameters"
    for n in trainable:
        assert prefix in n or "modules_to_save" in n, f"unexpected trainable tensor {n}"
    train_steps(model, name)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "no parameter changed after optimizer steps"
    frozen_moved = [n for n in moved if n not in trainable]
    assert not frozen_moved, f"frozen tensors changed: {frozen_moved}"


def check_merge_equivalence(
    name: str, config, dtype: torch.dtype = torch.float32, atol: float = 1e-5
) -> None:
    """Unmerged, merged, unmerged-again, safe-merged and merge_and_unload outputs agree."""
    model, base_out = wrap(name, config, dtype)
    train_steps(model, name) if dtype == torch.float32 else None
    model.eval()
    active = run(model, name, dtype)
    assert not torch.allclose(active.float(), base_out.float(), atol=atol), (
        "the adapter is still the identity; the merge check needs a non-identity adapter"
    )

    def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=atol, msg=what)

    model.base_model.merge_adapter()
    close(run(model, name, dtype), active, "merged vs unmerged")
    model.base_model.unmerge_adapter()
    close(run(model, name, dtype), active, "unmerged again vs unmerged")
    with model.disable_adapter():
        close(run(model, name, dtype), base_out, "after unmerge, disabled vs base")
    model.base_model.merge_adapter(safe_merge=True)
    close(run(model, name, dtype), active, "safe-merged vs unmerged")
    model.base_model.unmerge_adapter()
    merged = model.merge_and_unload()
    close(run(merged, name, dtype), active, "merge_and_unload vs unmerged")


def check_disable_adapter(name: str, config) -> None:
    """Inside ``disable_adapter()`` the outputs are the base model's; after it, the adapter's."""
    model, base_out = wrap(name, config)
    train_steps(model, name)
    active = run(model, name)
    assert not torch.allclose(active, base_out), "adapter did not change the output"
    with model.disable_adapter():
        torch.testing.assert_close(run(model, name), base_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, name), active, atol=0, rtol=0)


def check_multiple_adapters(name: str, config_a, config_b) -> None:
    """Two named adapters: switching gives each its own output; deleting one keeps the other."""
    model, _ = wrap(name, config_a)
    train_steps(model, name)
    out_a = run(model, name)
    model.add_adapter("other", copy.deepcopy(config_b))
    model.set_adapter("other")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        ".other" in n or "other" in n.split(".") or "modules_to_save" in n for n in trainable
    ), f"after set_adapter('other') the trainable tensors are {trainable}"
    train_steps(model, name)
    out_b = run(model, name)
    assert not torch.allclose(out_a, out_b), "the two adapters give the same output"
    model.set_adapter("default")
    torch.testing.assert_close(run(model, name), out_a, atol=1e-6, rtol=1e-6)
    model.delete_adapter("other")
    torch.testing.assert_close(run(model, name), out_a, atol=1e-6, rtol=1e-6)


_LOAD_SCRIPT = """
import sys, torch
torch.set_num_threads(1)  # as the parent computes its reference: the same summation order
sys.path.insert(0, {root!r})
import qpeft  # registers the methods; nothing else from qpeft is needed to load
from peft import PeftModel
from tests.contract.harness import build_tiny, run
base = build_tiny({name!r})
model = PeftModel.from_pretrained(base, {adapter!r})
torch.save(run(model, {name!r}), {out!r})
"""


def check_save_load_subprocess(name: str, config, tmp_path: Path) -> None:
    """save_pretrained -> a fresh interpreter (only ``import qpeft``) -> from_pretrained gives
    the same outputs bit for bit; the checkpoint is adapter_config.json + safetensors. Both
    processes evaluate on one thread: with two, a BLAS that adapts its threads to the machine's
    load may sum in another order (float rounding, ~1e-8, seen on a loaded host)."""
    model, _ = wrap(name, config)
    train_steps(model, name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = run(model, name)
    finally:
        torch.set_num_threads(threads)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    loaded = _outputs_in_fresh_process(_LOAD_SCRIPT, name, adapter_dir, tmp_path)
    assert torch.equal(loaded, expected), f"max diff {(loaded - expected).abs().max():.3e}"


def load_in_process(name: str, adapter_dir: Path) -> nn.Module:
    """Load a saved adapter onto a fresh base of case ``name`` in this process."""
    return PeftModel.from_pretrained(build_tiny(name), adapter_dir)


ConfigFactory = Callable[..., object]


def _outputs_in_fresh_process(script: str, name: str, adapter_dir: Path,
                              tmp_path: Path) -> torch.Tensor:
    """Run ``script`` (a template with ``root``, ``name``, ``adapter``, ``out``) in a fresh
    interpreter, offline; returns the outputs it saved. Asserts it exited cleanly."""
    out_file = tmp_path / "out.pt"
    code = script.format(root=str(REPO_ROOT), name=name, adapter=str(adapter_dir),
                         out=str(out_file))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_file, weights_only=True)


_STOCK_LOAD_SCRIPT = """
import sys, torch
sys.modules["qpeft"] = None  # importing qpeft raises ImportError from here on
sys.path.insert(0, {root!r})
from peft import PeftModel
from tests.contract.harness import build_tiny, run
model = PeftModel.from_pretrained(build_tiny({name!r}), {adapter!r})
torch.save(run(model, {name!r}), {out!r})
"""


def outputs_without_qpeft(name: str, adapter_dir: Path, tmp_path: Path) -> torch.Tensor:
    """Case ``name``'s outputs with the stock-peft adapter in ``adapter_dir`` loaded by
    ``PeftModel.from_pretrained`` in a fresh process where importing qpeft fails (an export
    must stand alone)."""
    return _outputs_in_fresh_process(_STOCK_LOAD_SCRIPT, name, adapter_dir, tmp_path)
