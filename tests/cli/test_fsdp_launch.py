"""FSDP2 through `accelerate launch --config_file examples/fsdp2.yaml` (README's line), on CPU.

accelerate does not do FSDP on CPU; qpeft shards the model itself (`fully_shard` per decoder
block + root, gloo). The slow tests run the README's exact launcher line with 2 CPU processes
on a tiny LLaMA folder and check that the run really was sharded (results.json records the
sharding and that every parameter was a DTensor while training), that it took the 1-process
run's steps (same losses, same adapter to float rounding), that the adapter saved by rank 0
reloads in one process and gives the 1-process adapter's logits, and that an interrupted
sharded run resumes to the uninterrupted result. The fast tests check the refusals.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import read_json

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_worker.py")
BUDGET = ["--max-steps", "4", "--no-progress"]  # appended to the README line


def readme_launch_line() -> list[str]:
    """The README's FSDP launch command (between the fsdp-launch markers), as argv."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- fsdp-launch -->", 1)[1].split("<!-- /fsdp-launch -->", 1)[0]
    command = block.strip().strip("`").strip().replace("\\\n", " ")
    return shlex.split(command)


def _replace_value(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def _launch_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_"))}  # nothing but the config file
    return dict(env, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    argv = [accelerate if a == "accelerate" else a for a in argv]
    proc = subprocess.run(argv, cwd=ROOT, env=_launch_env(), capture_output=True, text=True,
                          timeout=300)
    return proc


def _tiny_args(line: list[str], assets: dict[str, Path], out: Path) -> list[str]:
    line = _replace_value(line, "--model", str(assets["llama"]))
    line = _replace_value(line, "--train-file", str(assets["sft"]))
    return [*_replace_value(line, "--output-dir", str(out)), *BUDGET]


def _qpeft_args(launch: list[str]) -> list[str]:
    """The arguments after `-m qpeft`: the same run in one process."""
    return launch[launch.index("qpeft") + 1:]


def _assert_sharded(results: dict, method: str) -> None:
    s = results["sharding"]
    assert s is not None, f"{method}: the launched run was not sharded"
    assert (s["mode"], s["sharded_by"], s["num_processes"]) == ("fsdp2", "qpeft", 2)
    assert s["blocks"] == ["LlamaDecoderLayer"] and s["units"] == 3  # 2 layers + root
    assert s["dtensor_parameters"] == s["parameters"] > 0
    assert results["num_processes"] == 2


def _assert_same_run(sharded: Path, single: Path) -> None:
    """Same losses, metric and saved adapter (full tensors, not a rank's slice)."""
    from safetensors.torch import load_file

    a, b = read_json(sharded / "results.json"), read_json(single / "results.json")
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    assert a["metric_value"] == pytest.approx(b["metric_value"], rel=1e-6)
    got = load_file(sharded / "adapter/adapter_model.safetensors")
    want = load_file(single / "adapter/adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in got.values())


def _reloaded_logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import qpeft  # noqa: F401

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.arange(4, 20).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_readme_fsdp_line_shards_and_matches_one_process(tmp_path, assets, cli) -> None:
    line = readme_launch_line()
    assert line[:5] == ["accelerate", "launch", "--config_file", "examples/fsdp2.yaml",
                        "--num_processes"], line
    launch = _tiny_args(line, assets, tmp_path / "fsdp2")
    proc = _run(launch)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[qpeft] FSDP2: 3 fully_shard units (LlamaDecoderLayer + root) over 2 processes, " \
           "sharded by qpeft" in proc.stderr
    results = read_json(tmp_path / "fsdp2/results.json")
    method = results["method"]
    _assert_sharded(results, method)

    single = _replace_value(_qpeft_args(launch), "--output-dir", str(tmp_path / "one"))
    status, _, err = cli(*single)
    assert status == 0, err
    assert read_json(tmp_path / "one/results.json")["sharding"] is None
    _assert_same_run(tmp_path / "fsdp2", tmp_path / "one")
    torch.testing.assert_close(_reloaded_logits(assets["llama"], tmp_path / "fsdp2/adapter"),
                               _reloaded_logits(assets["llama"], tmp_path / "one/adapter"),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fsdp_compare_of_every_method_matches_one_process(tmp_path, assets, cli) -> None:
    """`qpeft compare` under the README's launcher: Quantum-PEFT, QuIC and QPA each sharded, each
    equal to its 1-process run; the compare table says how they ran."""
    launcher = readme_launch_line()
    launcher = launcher[:launcher.index("qpeft") + 1]
    data = ["--model", str(assets["llama"]), "--train-file", str(assets["sft"]),
            "--methods", "quantum-peft,quic,qpa", "--batch-size", "8", *BUDGET]
    proc = _run([*launcher, "compare", *data, "--output-dir", str(tmp_path / "fsdp2")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("fsdp2 x2 (qpeft)") == 3, proc.stdout  # rank 0 prints the table
    status, _, err = cli("compare", *data, "--output-dir", str(tmp_path / "one"))
    assert status == 0, err
    table = read_json(tmp_path / "fsdp2/compare.json")
    assert [r["sharding"] for r in table["rows"]] == ["fsdp2 x2 (qpeft)"] * 3
    assert "sharding" not in read_json(tmp_path / "one/compare.json")["table"]
    for method in ("quantum-peft", "quic", "qpa"):
        _assert_sharded(read_json(tmp_path / f"fsdp2/{method}/seed0/results.json"), method)
        _assert_same_run(tmp_path / f"fsdp2/{method}/seed0", tmp_path / f"one/{method}/seed0")


@pytest.mark.slow
def test_fsdp_run_interrupted_and_resumed_equals_one_process(tmp_path, assets, cli) -> None:
    """Checkpoints of a sharded run hold full tensors: a run stopped after step 3 (checkpoint at
    step 2) and resumed under the launcher ends where the uninterrupted 1-process run does."""
    line = readme_launch_line()
    launch = [*_tiny_args(line, assets, tmp_path / "fsdp2"), "--checkpoint-every", "2",
              "--method", "quic", "--eval-batch-size", "3"]  # uneven eval chunks per rank
    cut = launch.index("-m")
    stopped = _run([*launch[:cut], str(WORKER), "3", *_qpeft_args(launch)])
    assert stopped.returncode != 0
    assert torch.load(tmp_path / "fsdp2/checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "fsdp2/results.json").exists()
    resumed = _run([*launch, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    results = read_json(tmp_path / "fsdp2/results.json")
    assert results["resumed_from_step"] == 2
    _assert_sharded(results, "quic")
    status, _, err = cli(*_replace_value(_qpeft_args(launch), "--output-dir", str(tmp_path / "one")))
    assert status == 0, err
    _assert_same_run(tmp_path / "fsdp2", tmp_path / "one")


# ----------------------------------------------------------------------------- fast: refusals


def _fsdp_env(monkeypatch: pytest.MonkeyPatch, **settings: str) -> None:
    """The environment `accelerate launch` gives a process for an FSDP config."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in {"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                       "FSDP_OFFLOAD_PARAMS": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
                       "FSDP_ACTIVATION_CHECKPOINTING": "false", **settings}.items():
        monkeypatch.setenv(key, value)


def test_fsdp_settings_cpu_cannot_honour_stop_the_run(cli, tmp_path, assets, monkeypatch) -> None:
    _fsdp_env(monkeypatch, FSDP_VERSION="1", FSDP_OFFLOAD_PARAMS="true",
              FSDP_ACTIVATION_CHECKPOINTING="true")
    out = tmp_path / "run"
    status, _, err = cli("finetune", "--method", "quic", "--model", assets["llama"],
                         "--train-file", assets["sft"], "--max-steps", "1", "--batch-size", "4",
                         "--no-progress", "--output-dir", out)
    assert status == 2
    assert err.count("\n") == 1 and "accelerate does not do on CPU" in err
    for named in ("fsdp_version: 1", "fsdp_offload_params", "fsdp_activation_checkpointing",
                  "--gradient-checkpointing", "no process group"):
        assert named in err, named
    assert not out.exists()


def test_fsdp_without_a_process_group_is_refused(cli, tmp_path, assets, monkeypatch) -> None:
    """An FSDP2 config but one plain process (no launcher): refused, not run unsharded."""
    _fsdp_env(monkeypatch)
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["llama"],
                         "--train-file", assets["sft"], "--max-steps", "1", "--batch-size", "4",
                         "--no-progress", "--output-dir", tmp_path / "run")
    assert status == 2 and "no process group" in err and "fsdp_version" not in err


def test_without_fsdp_config_nothing_is_sharded(cli, tmp_path, assets, monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["llama"],
                         "--train-file", assets["sft"], "--max-steps", "1", "--batch-size", "4",
                         "--no-progress", "--output-dir", tmp_path / "run")
    assert status == 0, err
    assert read_json(tmp_path / "run/results.json")["sharding"] is None


def test_block_classes_from_the_config_or_the_model(assets) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qpeft.train.sharding import block_class_names

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["llama"]),
                           LoraConfig(target_modules=["q_proj"]))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2,
                                            auto_wrap_policy="transformer_based_wrap")
    assert block_class_names(model, plugin) == ["LlamaDecoderLayer"]  # _no_split_modules
    plugin.transformer_cls_names_to_wrap = ["LlamaMLP"]
    assert block_class_names(model, plugin) == ["LlamaMLP"]
    plugin.transformer_cls_names_to_wrap = ["BertLayer"]
    with pytest.raises(ValueError, match="BertLayer"):
        block_class_names(model, plugin)


def test_compare_table_shows_the_sharding() -> None:
    from qpeft.train.compare import format_table, sharding_label

    row = {"method": "quic", "trainable_params": 72, "adapter_params": 72,
           "metric": "perplexity", "mean": 49.4, "std": 0.0, "train_seconds": 1.0,
           "peak_memory_mb": 400.0}
    record = {"mode": "fsdp2", "num_processes": 2, "sharded_by": "qpeft"}
    table = format_table([{**row, "sharding": sharding_label(record)},
                          {**row, "method": "lora", "sharding": sharding_label(None)}])
    header, _, quic, lora = table.splitlines()
    assert header.split()[-1] == "sharding"
    assert quic.endswith("fsdp2 x2 (qpeft)") and lora.endswith("none")
    assert "sharding" not in format_table([row])
