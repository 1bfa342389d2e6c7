"""`--model` sources (bundled / folder / GGUF / hub id) and the SFT JSONL reader."""

from __future__ import annotations

import json

import pytest

from qpeft.assets import AssetError
from qpeft.assets.sft import jsonl_kind, load_sft, read_sft_file
from qpeft.assets.sources import ModelSource, default_target_modules, resolve_model_source


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_resolve_model_source(tmp_path, monkeypatch):
    assert resolve_model_source("minilm") == ModelSource("bundled", "minilm")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model_source(str(folder)) == ModelSource("folder", str(folder.resolve()))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("./m").location == str(folder.resolve())
    (tmp_path / "x.GGUF").write_bytes(b"")
    assert resolve_model_source("x.GGUF").kind == "gguf"
    assert resolve_model_source("org/name") == ModelSource("hub", "org/name")
    assert resolve_model_source("gpt2").kind == "hub"
    assert ModelSource("folder", str(folder)).label == "m"
    for bad, message in (("./missing", "no such folder"), ("a/b/c", "no such folder"),
                         ("y.gguf", "no such folder")):
        with pytest.raises(AssetError, match=message):
            resolve_model_source(bad)


def test_default_target_modules_are_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    for model_type in ("llama", "mistral", "qwen2", "gpt2", "bert"):
        assert default_target_modules(model_type) == list(MAP[model_type])
    assert default_target_modules("no-such-architecture") == []


def test_jsonl_kind(tmp_path):
    assert jsonl_kind(_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "p"}])) == \
        "text-classification"
    assert jsonl_kind(_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])) == "causal-lm"
    assert jsonl_kind(_jsonl(tmp_path / "c.jsonl", [{"prompt": "x", "completion": "y"}])) == \
        "causal-lm"
    assert jsonl_kind(_jsonl(tmp_path / "d.jsonl", [{"text": "x", "topic": "p"}]),
                      label_column="topic") == "text-classification"
    (tmp_path / "e.csv").write_text("text\nx\n")
    assert jsonl_kind(tmp_path / "e.csv") == "text-classification"


def test_file_format_is_the_majority_and_others_are_bad(tmp_path):
    path = _jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}] * 3
                  + [{"text": "c"}])
    with pytest.raises(AssetError, match=r"line 4: missing field\(s\) \['prompt', 'completion'\]"):
        read_sft_file(path)
    records, skipped = read_sft_file(path, skip_bad_records=True)
    assert len(records) == 3 and {r.format for r in records} == {"prompt-completion"}
    assert skipped == [{"file": str(path), "line": 4,
                        "reason": "missing field(s) ['prompt', 'completion'] (this file's "
                                  "records are prompt-completion)"}]
    with pytest.raises(AssetError, match="no record has"):
        read_sft_file(_jsonl(tmp_path / "g.jsonl", [{"body": "x"}]))
    with pytest.raises(AssetError, match="every record is bad"):
        read_sft_file(_jsonl(tmp_path / "h.jsonl", [{"prompt": "a", "completion": " "}]),
                      skip_bad_records=True)


def test_load_sft_split_is_seeded_and_eval_keeps_file_order(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl",
                  [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)])
    a = load_sft(path, seed=1)
    b = load_sft(path, seed=1)
    c = load_sft(path, seed=2)
    assert [r.line for r in a.train] == [r.line for r in b.train]
    assert [r.line for r in a.eval] == sorted(r.line for r in a.eval)
    assert len(a.eval) == 10 and len(a.train) == 40
    assert {r.line for r in a.train} | {r.line for r in a.eval} == set(range(1, 51))
    assert {r.line for r in a.eval} != {r.line for r in c.eval}
    assert a.kind == "causal-lm" and a.metric == "perplexity"
    assert a.split["format"] == "prompt-completion" and a.split["skipped_count"] == 0
    small = load_sft(path, seed=1, max_train=5, max_eval=3)
    assert [r.line for r in small.train] == [r.line for r in a.train][:5]
    assert [r.line for r in small.eval] == [r.line for r in a.eval][:3]
