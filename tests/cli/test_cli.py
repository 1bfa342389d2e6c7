"""The `qpeft` command on tiny budgets: every subcommand, results.json, and every bad input
(one message, exit status 2, nothing written or overwritten)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.cli.conftest import read_json

RESULT_KEYS = {"method", "model", "task", "seed", "trainable_params", "total_params", "metric",
               "metric_value", "train_seconds", "peak_memory_mb", "steps", "versions", "command",
               "split", "peft_config"}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("model,data,metric", [("bert", "table", "accuracy"),
                                               ("llama", "sft", "perplexity"),
                                               ("llama", "text", "perplexity")])
def test_finetune_writes_results_and_a_loadable_adapter(cli, tmp_path, assets, model, data,
                                                        metric):
    out = tmp_path / "run"
    status, stdout, _ = cli("finetune", "--method", "lora", "--model", assets[model],
                            "--train-file", assets[data], "--max-steps", "2", "--batch-size",
                            "4", "--max-length", "32", "--no-progress", "--output-dir", out)
    assert status == 0, stdout
    res = read_json(out / "results.json")
    assert RESULT_KEYS <= res.keys()
    assert res["metric"] == metric and res[metric] == res["metric_value"]
    assert res["steps"] == 2 and len(res["losses"]) == 2
    assert res["command"][:2] == ["qpeft", "finetune"] and str(out) in res["command"]
    assert 0 < res["trainable_params"] < res["total_params"]
    assert res["versions"]["torch"] and res["versions"]["peft"]
    assert res["peak_memory_mb"] > 0
    assert res["model_source"] == {"kind": "folder", "location": str(assets[model].resolve())}
    # peft's per-architecture defaults
    assert res["target_modules"] == (["query", "value"] if model == "bert"
                                     else ["q_proj", "v_proj"])
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert metric in stdout
    # the adapter reloads through peft onto the same folder and holds the trainable tensors
    import peft
    import transformers
    from safetensors.torch import load_file

    if model == "bert":
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            assets[model], num_labels=3)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(assets[model])
    reloaded = peft.PeftModel.from_pretrained(base, str(out / "adapter"))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    n_loaded = sum(p.numel() for n, p in reloaded.named_parameters()
                   if "lora_" in n or "modules_to_save" in n)
    assert n_loaded == res["trainable_params"] == sum(t.numel() for t in saved.values())


def test_same_seed_same_result_and_no_run_dir_clash(cli, tmp_path, tiny_text):
    args = ["finetune", "--method", "lora", *tiny_text, "--max-steps", "3"]
    assert cli(*args, "--output-dir", str(tmp_path / "a"))[0] == 0
    assert cli(*args, "--output-dir", str(tmp_path / "b"))[0] == 0
    a, b = read_json(tmp_path / "a/results.json"), read_json(tmp_path / "b/results.json")
    assert a["losses"] == b["losses"] and a["metric_value"] == b["metric_value"]


def test_existing_run_is_refused_then_overwritten_or_resumed(cli, tmp_path, tiny_text):
    out = tmp_path / "run"
    args = ["finetune", "--method", "lora", *tiny_text, "--max-steps", "4",
            "--checkpoint-every", "2", "--output-dir", str(out)]
    assert cli(*args)[0] == 0
    before = _snapshot(out)
    status, _, err = cli(*args)
    assert status == 2 and "holds this run already" in err and "--resume" in err
    status, _, err = cli(*[a if a != "4" else "5" for a in args])
    assert status == 2 and "holds a different run" in err
    status, _, err = cli(*[a if a != "4" else "5" for a in args], "--resume")
    assert status == 2 and "different run" in err
    assert _snapshot(out) == before  # nothing touched by the refusals
    # resume of the finished run: continues from step 4 (nothing to train), same metric
    assert cli(*args, "--resume")[0] == 0
    res = read_json(out / "results.json")
    assert res["resumed_from_step"] == 4
    assert res["metric_value"] == json.loads(before["results.json"])["metric_value"]
    assert cli(*[a if a != "4" else "5" for a in args], "--overwrite")[0] == 0
    assert read_json(out / "results.json")["steps"] == 5


def test_cli_resume_after_interruption_matches_uninterrupted(cli, tmp_path, tiny_text, monkeypatch):
    import qpeft.train.finetune as ft

    args = ["finetune", "--method", "lora", *tiny_text, "--max-steps", "5",
            "--checkpoint-every", "2"]
    assert cli(*args, "--output-dir", str(tmp_path / "full"))[0] == 0
    real = ft.train

    def interrupted(*a, **kw):
        def stop(step, loss):
            if step == 3:
                raise KeyboardInterrupt
        return real(*a, **{**kw, "on_step": stop})

    monkeypatch.setattr(ft, "train", interrupted)
    status, _, err = cli(*args, "--output-dir", str(tmp_path / "cut"))
    assert status == 130 and "--resume" in err
    assert not (tmp_path / "cut/results.json").exists()
    monkeypatch.setattr(ft, "train", real)
    assert cli(*args, "--output-dir", str(tmp_path / "cut"), "--resume")[0] == 0
    full = read_json(tmp_path / "full/results.json")
    cut = read_json(tmp_path / "cut/results.json")
    assert cut["resumed_from_step"] == 2  # stopped at step 3: step 3 is redone
    assert cut["losses"] == full["losses"] and cut["metric_value"] == full["metric_value"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut/adapter/adapter_model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("argv,message", [
    (["--method", "lorax"], "unknown method 'lorax'; valid methods: quantum-peft"),
    (["--method", "lora", "--depth", "3"], "--depth does not apply to method 'lora'"),
    (["--method", "lora", "--batch-size", "512"], "fewer than --batch-size 512"),
    (["--method", "oft", "--rank", "3", "--oft-block-size", "8"],
     "invalid options for method 'oft'"),
    (["--method", "lora", "--packing"], "--packing applies to causal-LM JSONL data"),
    (["--method", "lora", "--eval-generate", "2"], "--eval-generate applies to causal-LM"),
])
def test_bad_input_exits_2_and_writes_nothing(cli, tmp_path, tiny_text, argv, message):
    out = tmp_path / "out"
    status, stdout, err = cli("finetune", *tiny_text, *argv, "--output-dir", str(out))
    assert status == 2
    assert message in err and err.startswith("qpeft: error: ") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt9", "--task", "bbc-news"], "unknown model 'gpt9'"),
    (["--model", "minilm", "--task", "imdb"], "unknown task 'imdb'"),
    (["--model", "minilm"], "give --task"),
    (["--model", "minilm", "--task", "shakespeare"],
     "model 'minilm' (text-classification) cannot run task 'shakespeare' (causal-lm)"),
])
def test_bad_names_exit_2_and_write_nothing(cli, tmp_path, argv, message):
    out = tmp_path / "out"
    status, stdout, err = cli("finetune", "--method", "lora", *argv, "--output-dir", str(out))
    assert status == 2
    assert message in err and err.startswith("qpeft: error: ") and err.count("\n") == 1
    assert not out.exists()


def _table(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    path.write_text("\n".join([",".join(header), *(f"{t},{lab}" for t, lab in rows)]) + "\n")
    return path


@pytest.mark.parametrize("rows,header,message", [
    ([("w1 w2", "a"), ("w3", "b")], ("body", "label"), "text"),
    ([], ("text", "label"), "empty"),
    ([("w1 w2", "a"), ("w3 w4", "a"), ("w5", "a")], ("text", "label"), "class"),
])
def test_bad_tables_exit_2(cli, tmp_path, assets, rows, header, message):
    table = _table(tmp_path / "t.csv", rows, header)
    out = tmp_path / "out"
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["bert"], "--train-file",
                         str(table), "--output-dir", str(out), "--no-progress")
    assert status == 2 and message in err, err
    assert not out.exists()


def test_user_table_trains(cli, tmp_path, assets):
    rows = [(" ".join(f"w{(i * 7 + j) % 10 + 10 * (i % 2)}" for j in range(5)), "ab"[i % 2])
            for i in range(40)]
    table = _table(tmp_path / "t.csv", rows)
    out = tmp_path / "out"
    status, stdout, err = cli("finetune", "--method", "lora", "--model", assets["bert"],
                              "--train-file", str(table), "--max-steps", "2", "--batch-size",
                              "8", "--output-dir", str(out), "--no-progress")
    assert status == 0, err
    res = read_json(out / "results.json")
    assert res["task"] == "table" and res["label_names"] == ["a", "b"]
    assert res["train_size"] + res["eval_size"] == 40


def test_missing_train_file_and_unwritable_output(cli, tmp_path, tiny_text, monkeypatch):
    status, _, err = cli("finetune", "--method", "lora", "--model", tiny_text[1], "--train-file",
                         str(tmp_path / "nope.csv"), "--output-dir", str(tmp_path / "o"))
    assert status == 2 and "does not exist" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, _, err = cli("finetune", "--method", "lora", *tiny_text,
                         "--output-dir", str(blocker / "sub"))
    assert status == 2 and "is a file" in err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path)
                        else real_access(p, mode))  # root ignores permission bits
    status, _, err = cli("finetune", "--method", "lora", *tiny_text,
                         "--output-dir", str(tmp_path / "new"))
    assert status == 2 and "not writable" in err
    assert not (tmp_path / "new").exists()


def test_compare_table_json_and_plot(cli, tmp_path, tiny_text):
    out = tmp_path / "cmp"
    data = tiny_text[:4]
    status, stdout, err = cli("compare", *data,
                              "--methods", "lora,hra", "--seeds", "2", "--max-steps", "2",
                              "--batch-size", "8", "--rank", "2", "--no-progress",
                              "--lr-for", "hra=1e-3", "--output-dir", str(out))
    assert status == 0, err
    cmp = read_json(out / "compare.json")
    assert [r["method"] for r in cmp["rows"]] == ["lora", "hra"]
    assert len(cmp["runs"]) == 4 and {r["seed"] for r in cmp["runs"]} == {0, 1}
    lora = cmp["rows"][0]
    values = [r["metric_value"] for r in cmp["runs"] if r["method"] == "lora"]
    assert lora["mean"] == pytest.approx(sum(values) / 2)
    assert lora["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lora" in stdout and "hra" in stdout and "pareto.png" in stdout
    assert all(r["method_options"]["rank"] == 2 for r in cmp["runs"])
    assert [r["lr"] for r in cmp["rows"]] == [2e-3, 1e-3]
    status, _, err = cli("compare", *data, "--methods", "lora", "--output-dir", str(out))
    assert status == 2 and "compare.json" in err
    status, _, err = cli("compare", *data, "--methods", "lora,zap", "--output-dir", str(tmp_path / "x"))
    assert status == 2 and "unknown method 'zap'" in err
    status, _, err = cli("compare", *data, "--methods", "lora", "--lr-for", "hra=1e-3",
                         "--output-dir", str(tmp_path / "y"))
    assert status == 2 and "not in --methods" in err


def test_count_matches_the_wrapped_model(cli, assets):
    status, stdout, _ = cli("count", "--model", assets["bert"], "--method", "lora", "--rank",
                            "2", "--num-labels", "5", "--json")
    assert status == 0
    table = json.loads(stdout)
    # lora r=2 on query/value (32x32) of 2 layers: 4 modules x 2*(32+32); a 5-label head
    assert table["per_module"] and all(v == 2 * 64 for v in table["per_module"].values())
    assert len(table["per_module"]) == 4
    assert table["modules_to_save"] == {"classifier": 32 * 5 + 5}
    assert table["total"] == 4 * 128 + 165


def test_count_from_a_config_file_on_meta(cli, tmp_path):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    status, stdout, err = cli("count", "--config-file", str(path), "--method", "lora",
                              "--rank", "4", "--json")
    assert status == 0, err
    table = json.loads(stdout)
    # q_proj 64->64, v_proj 64->32 (2 kv heads x 16): r*(in+out)
    assert table["total"] == 3 * (4 * (64 + 64) + 4 * (64 + 32))
    status, _, err = cli("count", "--config-file", str(tmp_path / "none.json"), "--method", "lora")
    assert status == 2 and "does not exist" in err


@pytest.mark.parametrize("method", ["quantum-peft", "quic", "qpa"])
def test_count_our_methods_agrees_with_closed_form(cli, assets, method):
    status, stdout, err = cli("count", "--model", assets["bert"], "--method", method,
                              "--num-labels", "5", "--json")
    assert status == 0, err
    table = json.loads(stdout)
    assert table["closed_form_total"] == table["total"] > 0


def test_help_lists_every_command(cli, capsys):
    from qpeft.cli import build_parser

    text = build_parser().format_help()
    for command in ("finetune", "compare", "count", "demo", "export-lora"):
        assert command in text
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["finetune"])
    assert exc.value.code == 2


def test_export_lora_bad_folder_exits_2(cli, tmp_path):
    status, _, err = cli("export-lora", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert status == 2 and "missing" in err


def test_export_lora_refuses_a_method_without_an_exact_lora_form_in_one_line(cli, tmp_path):
    import json

    (tmp_path / "oft").mkdir()
    (tmp_path / "oft" / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT"}))
    status, _, err = cli("export-lora", str(tmp_path / "oft"), str(tmp_path / "out"))
    assert status == 2 and "'OFT' adapter" in err and "QPA" in err
    assert len(err.strip().splitlines()) == 1
