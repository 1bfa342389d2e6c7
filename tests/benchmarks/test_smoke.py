"""Smoke test of the benchmarks: each runs at toy size and writes the JSON it promises.

No wall-clock assertion anywhere: only structure, exactness of the references the benchmarks
compare against, and the papers' parameter counts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import compounds, generation, merged, param_counts, scale, train_step
from benchmarks import models as M
from benchmarks import scale_generation as G
from benchmarks.__main__ import main as bench_main


def _qpeft_methods() -> tuple[str, ...]:
    assert M.QPEFT_METHODS == ("quantum_peft", "quic", "qpa")  # a broken tuner fails here
    return M.QPEFT_METHODS


def test_dense_reference_matches_pauli_stiefel_fp64():
    from qpeft.circuits.pauli import pauli_num_params, pauli_stiefel

    for n_qubits, depth in ((3, 1), (4, 2), (5, 3)):
        p = torch.rand(pauli_num_params(n_qubits, depth), dtype=torch.float64) * 6.0
        got = pauli_stiefel(p, n_qubits, depth, 4)
        ref = generation.dense_pauli_stiefel(p, n_qubits, depth, 4)
        assert torch.allclose(got, ref, atol=1e-10, rtol=0)


def test_dense_reference_can_fail():
    """A different angle vector must give a different dense U (the comparison is not vacuous)."""
    p = torch.rand(generation.qpeft_generator(16, 4, 1)[1], dtype=torch.float64)
    a = generation.dense_pauli_stiefel(p, 4, 1, 4)
    b = generation.dense_pauli_stiefel(p + 0.1, 4, 1, 4)
    assert (a - b).abs().max() > 1e-3


def test_minors_compound_matches_fast_compound_fp64():
    from qpeft.circuits.compound import compound

    a = torch.randn(7, 7, dtype=torch.float64)
    for k in (1, 2, 3, 4):
        assert torch.allclose(compounds.minors_compound(a, k), compound(a, k), atol=1e-10)
    i, j = (0, 2), (1, 5)  # one entry by hand: det of the 2x2 minor
    sub = a[list(i)][:, list(j)]
    r = compounds.minors_compound(a, 2)
    from qpeft.circuits.compound import k_subsets

    s = k_subsets(7, 2)
    assert math.isclose(float(r[s.index(i), s.index(j)]), float(torch.linalg.det(sub)),
                        abs_tol=1e-12)


def test_compounds_quick(tmp_path):
    res = compounds.run(quick=True, out_dir=tmp_path)
    data = json.loads((tmp_path / "compounds.json").read_text())
    assert data["cases"] == json.loads(json.dumps(res["cases"]))
    assert [(c["n"], c["k"]) for c in data["cases"]] == list(compounds.QUICK_CASES)
    for c in data["cases"]:
        assert c["max_abs_diff_fp32"] < 1e-5
        assert c["fast_fwd_s"] > 0 and c["minors_fwdbwd_s"] > 0 and c["speedup_fwd"] > 0
    assert (tmp_path / "compounds.md").read_text().startswith("| n | k |")


def test_generation_quick(tmp_path):
    generation.run(quick=True, out_dir=tmp_path)
    data = json.loads((tmp_path / "generation.json").read_text())
    pts = data["points"]
    assert len(pts) == len(generation.QUICK_SIZES) * len(generation.QUICK_DEPTHS)
    assert not [p for p in pts if "error" in p], pts
    for p in pts:
        assert p["orthonormality_err"] < 1e-5
        if p["N"] == 16:
            assert p["method"] == "pauli" and p["max_abs_diff_vs_dense"] < 1e-5
        else:
            assert p["method"] == "generalized" and "dense_fwd_s" not in p
    assert (tmp_path / "generation.png").stat().st_size > 1000


def test_train_step_quick(tmp_path):
    methods = ("lora",) + _qpeft_methods()[:1]
    train_step.run(quick=True, out_dir=tmp_path, models=("minilm",), methods=methods)
    data = json.loads((tmp_path / "train_step.json").read_text())
    rows = data["models"]["minilm"]["methods"]
    assert set(rows) == set(methods)
    for method, row in rows.items():
        assert "error" not in row, (method, row)
        assert row["trainable"] > 0 and row["n"] >= 1
        mem = row["memory"]
        assert "error" not in mem, (method, mem)
        assert mem["peak_rss_mib"] >= mem["rss_before_mib"] > 0
    assert rows["lora"]["time_ratio"] == 1.0 and rows["lora"]["peak_ratio"] == 1.0
    # LoRA r=8 on a 64-wide tiny BERT, query+value in 2 layers, plus the classifier (64*5+5)
    assert rows["lora"]["trainable"] == 2 * 2 * 8 * (64 + 64) + 64 * 5 + 5


def test_train_step_at_the_cli_defaults_quick(tmp_path):
    """``--cli-defaults``: each method as ``qpeft finetune`` builds it with nothing named — on
    a causal LM LoRA on the model's q_proj, v_proj, Quantum-PEFT on every linear layer, QuIC
    there in 12 blocks (too many for the tiny model's 32-wide projections: not run here) —
    written apart from the benchmark configurations' results."""
    from benchmarks import models as M

    spec = M.model_spec("smollm2", quick=True)
    assert M.cli_default_config("quic", spec).num_blocks == 12
    assert M.method_config("quic", spec.targets, spec.task_type).num_blocks != 12
    train_step.run(quick=True, out_dir=tmp_path, models=("smollm2",),
                   methods=("lora", "quantum_peft"), memory=False, cli_defaults=True)
    assert not (tmp_path / "train_step.json").exists()
    data = json.loads((tmp_path / "train_step_cli.json").read_text())
    rows = data["models"]["smollm2"]["methods"]
    assert rows["lora"]["targets"] == ["q_proj", "v_proj"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
            "down_proj"} <= set(rows["quantum_peft"]["targets"])
    assert rows["quantum_peft"]["trainable"] > 0 and rows["lora"]["time_ratio"] == 1.0
    assert "qpeft finetune" in (tmp_path / "train_step_cli.md").read_text()


def test_merged_quick(tmp_path):
    methods = ("lora",) + _qpeft_methods()
    merged.run(quick=True, out_dir=tmp_path, models=("minilm",), methods=methods)
    data = json.loads((tmp_path / "merged.json").read_text())
    rows = data["models"]["minilm"]["methods"]
    for method, row in rows.items():
        assert "error" not in row, (method, row)
        assert row["same_modules_as_base"] is True
        assert row["max_abs_diff_merged_vs_adapter"] < 1e-4
        assert row["output_changed_vs_base"] > 1e-4  # the adapters were moved off identity
        assert row["ratio_to_base"] > 0


def test_many_adapters_quick(tmp_path):
    from benchmarks import many_adapters

    many_adapters.run(quick=True, out_dir=tmp_path)
    data = json.loads((tmp_path / "many_adapters.json").read_text())
    assert set(data["methods"]) == set(many_adapters.METHODS)
    assert set(data["as_lora"]) == {"quantum_peft", "qpa"}  # the methods with a LoRA form
    for method, row in data["methods"].items():
        assert row["max_abs_diff_vs_rows"] < 1e-5, method  # each row got its own adapter
        assert row["bytes_per_adapter"] > 0 and row["load_ms"] > 0 and row["hotswap_ms"] > 0
    for method, row in data["as_lora"].items():
        assert row["max_abs_diff_vs_qpeft"] < 1e-4, method  # the export serves the same model
    sizes = {m: r["bytes_per_adapter"] for m, r in data["methods"].items()}
    assert sizes["quantum_peft"] < sizes["lora"]
    for distinct in data["routings"]:
        assert data["methods"]["lora"]["mixed"][str(distinct)]["throughput_vs_lora"] == 1.0


def test_param_counts_match_papers(tmp_path):
    param_counts.run(out_dir=tmp_path)
    data = json.loads((tmp_path / "param_counts.json").read_text())
    by_item = {r["item"]: r for r in data["rows"]}
    must = {
        "DeBERTaV3-base C1⊕C2, N=3, query/value (reference n² convention)": 34848,
        "STS-B C1, N=8 on 24 output.dense + regression head": 1770241,
        "STS-B C1⊕C2, N=8 on 24 output.dense + regression head": 33217,
        "LLaMA-7B C1⊕C2, N=4, q_proj/v_proj (reference n²)": 495616,
        "adapter total, 4096x4096, L=1, K=8": 76,
        "GPT-2 lm_head r=4, n_mlp=2048, L=8: QPA trainable": 106264,
    }
    for item, value in must.items():
        assert by_item[item]["computed"] == value, by_item[item]
        assert by_item[item]["match"] is True
    assert data["matched"] >= 25


def test_compare_rule():
    from qpeft.tuners._paper_counts import matches

    assert matches(34848, 34848) and not matches(34849, 34848)
    assert matches(1327104, "1.33M") and not matches(393216, "0.35M")
    assert matches("52.06%", "52.06%") and not matches("1%", "2%")


def test_report_renders(tmp_path):
    param_counts.run(out_dir=tmp_path)
    doc = tmp_path / "b.md"
    bench_main(["report", "--out", str(tmp_path), "--doc", str(doc)])
    text = doc.read_text()
    assert "## 5. The papers' parameter counts" in text and "34,848" in text
    assert "_Not run._" in text  # the other sections were not run in this folder


def test_report_renders_a_stored_gpu_result(tmp_path):
    """The GPU section (never run here: no GPU) renders from its stored result."""
    import shutil

    from benchmarks._common import RESULTS_DIR

    shutil.copy(RESULTS_DIR / "scale_cuda.json", tmp_path / "scale_cuda.json")
    doc = tmp_path / "b.md"
    bench_main(["report", "--out", str(tmp_path), "--doc", str(doc)])
    text = doc.read_text()
    section = text[text.index("## 8. LLaMA-7B-shaped layers on a GPU"):]
    assert "NVIDIA" in section and "| peft LoRA r=8 |" in section and "8 layers" in section


@pytest.mark.parametrize("bad", [0, -1])
def test_round_robin_rejects_bad_repeats(bad):
    from benchmarks._common import round_robin

    with pytest.raises(ValueError, match="repeats"):
        round_robin({"a": lambda: None}, 0, bad)


def test_paired_ratio_cancels_drift_between_rounds():
    from benchmarks._common import paired_ratio, ratio

    # the machine slows down 3x over the rounds; the method is always 2x its reference
    ref = [1.0, 1.5, 3.0, 3.0]
    method = [2.0, 3.0, 6.0, 6.0]
    assert paired_ratio(method, ref) == 2.0
    assert paired_ratio([], ref) is None
    # drift in the other direction inside one round shows in the ratio of medians instead
    assert ratio(2.0, 3.0) != paired_ratio([2.0, 4.0, 2.0], [3.0, 2.0, 1.0])


def test_scale_quick(tmp_path):
    """The LLaMA-layer benchmark at toy size: every method builds and steps; LoRA's count is
    r·(in + out) summed over the 7 modules; memory was measured in subprocesses."""
    methods = ("lora", "quic")
    scale.run(quick=True, out_dir=tmp_path, tokens=(8,), methods=methods)
    data = json.loads((tmp_path / "scale.json").read_text())
    rows = data["tokens"]["8"]
    assert set(rows) == set(methods)
    for method, row in rows.items():
        assert "error" not in row and "error" not in row["memory"], (method, row)
        assert row["n"] >= 1 and row["memory"]["peak_rss_mib"] > 0
    h, i = 64, 128
    assert rows["lora"]["trainable"] == 8 * (4 * (h + h) + 2 * (h + i) + (i + h))
    assert rows["lora"]["lora_paired_ratio"] == 1.0 and rows["lora"]["peak_ratio"] == 1.0
    gen = data[G.KEY]  # the 70B section ran too, at its toy size, with memory for QuIC
    assert set(gen["methods"]) == set(methods) and gen["base"]["n"] >= 1
    assert "median_s" not in gen["methods"]["lora"]
    assert gen["methods"]["quic"]["memory"]["peak_rss_mib"] > 0
    assert "70B-shaped layer" in (tmp_path / "scale.md").read_text()


def _gqa_shapes() -> dict[str, tuple[int, int]]:
    shapes = G.linear_shapes(G.layer_config(quick=True))
    h, i, kv = 64, 160, 32  # 4 heads of 16, 2 KV heads
    assert shapes == {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
                      "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
                      "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return shapes


def test_70b_shapes_are_llama_70b():
    shapes = G.linear_shapes(G.layer_config(quick=False))
    assert shapes["self_attn.k_proj"] == (1024, 8192) and shapes["mlp.down_proj"] == (8192, 28672)
    assert sum(o * i for o, i in shapes.values()) == 855_638_016
    assert G.skip_reason("fourierft", shapes, 1.0) and "3.19 GiB" in G.skip_reason(
        "fourierft", shapes, 1.0)
    assert G.skip_reason("fourierft", shapes, 4.0) is None
    assert all(G.skip_reason(m, shapes, 1.0) is None for m in scale.METHODS if m != "fourierft")


def test_stand_in_linears_take_no_memory():
    model = G.StandInLinears({"mlp.up_proj": (28672, 8192)})
    w = model.mlp.up_proj.weight
    assert w.shape == (28672, 8192) and w.stride() == (0, 0)
    assert w.untyped_storage().nbytes() == 4 and not w.requires_grad


def test_scale_generation_quick_counts_and_coverage():
    """Toy 70B section: what each method generates has the size its construction says, and one
    generation step reaches every trainable tensor (no module left out)."""
    shapes = _gqa_shapes()
    section = G.measure(quick=True, methods=scale.METHODS, memory=False)
    rows = section["methods"]
    lora_count = 8 * sum(o + i for o, i in shapes.values())
    assert rows["lora"]["trainable"] == lora_count
    for method in ("lora", "vera"):
        assert rows[method]["generated"] == G.NOT_GENERATED and "median_s" not in rows[method]
    expected = {
        "quantum_peft": lora_count + 7 * 8,  # U, V (K = 8 columns) and λ per module
        "qpa": 2 * lora_count,  # lora_B, lora_A at r = 8, the offset start's r columns appended
        "oft": 32 * sum(i for _, i in shapes.values()),  # in/32 blocks of 32 x 32
        "fourierft": sum(o * i for o, i in shapes.values()),  # dense ΔW
    }
    for method, numbers in expected.items():
        assert rows[method]["numbers_generated"] == numbers, method
    for method, row in rows.items():
        assert "error" not in row, (method, row)
        if method not in ("lora", "vera"):
            assert row["n"] >= 1 and row["base_paired_ratio"] > 0
    assert section["base"]["n"] >= 1
    assert all(f.startswith("d=") and "C1 = A" in f for f in rows["quic"]["forms"])
    for method in ("quantum_peft", "quic", "qpa", "oft", "fourierft"):
        model = G.wrap(method, shapes)
        G.generation_step(model, G.generation(method, model, G.QUICK_TOKENS))()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (method, missing)


def test_scale_generation_skips_dense_over_budget():
    section = G.measure(quick=True, methods=("fourierft",), memory=False, max_dense_gib=0.0,
                        base=False)
    row = section["methods"]["fourierft"]
    assert "skipped" in row and "trainable" not in row and section["base"] == {}


def test_scale_only_70b_keeps_the_7b_tables(tmp_path):
    from benchmarks import _common as C

    kept = {"lora": {"label": "peft LoRA r=8", "error": "kept from an earlier run"}}
    old = {"benchmark": "scale", "quick": True, "machine": C.machine_facts(),
           "layer": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                     "targets": list(scale.TARGETS_7B)}, "tokens": {"8": kept}}
    C.write_result("scale", old, "", tmp_path)
    scale.main(["--quick", "--only-70b", "--no-memory", "--methods", "lora", "oft",
                "--out", str(tmp_path)])
    data = json.loads((tmp_path / "scale.json").read_text())
    assert data["tokens"] == {"8": kept}
    assert set(data[G.KEY]["methods"]) == {"lora", "oft"}
    text = (tmp_path / "scale.md").read_text()
    assert "kept from an earlier run" in text and "70B-shaped layer" in text


@pytest.mark.parametrize(("d_in", "tokens", "forms_c2"), [
    (256, 1, False),  # one token: C_2 applied as the action
    (256, 512, True),  # many tokens: C_2 formed (at n = 16 the crossover is ~70 tokens)
    (1, 4096, False),  # many tokens, W one column wide: the weight path rotates that column
])
def test_quic_generation_forms_what_the_forward_forms(d_in, tokens, forms_c2, monkeypatch):
    """The 70B section's QuIC generation mirrors the forward's choices (path, then per order
    explicit or action): it forms C_2 exactly when a training forward at that token count
    forms it."""
    import qpeft.circuits.compound_rotation as quic_kernels

    # 3 blocks of n = 16 (C(16, 2) = 120): large enough that one token takes the action; at
    # n <= ~13 the cost model forms C_2 for any token count
    shapes = {"mlp.up_proj": (408, d_in)}
    model = G.wrap("quic", shapes)
    calls: list[int] = []
    real = quic_kernels.compound

    def counting(a: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(k)
        return real(a, k)

    monkeypatch.setattr(quic_kernels, "compound", counting)
    ops = G.generation("quic", model, tokens)()
    assert [tuple(op.shape[-2:]) for op in ops] == [(16, 16), (120, 120) if forms_c2 else (16, 16)]
    assert calls == ([2] if forms_c2 else [])
    calls.clear()
    layer = model.base_model.model.mlp.up_proj
    layer(torch.randn(tokens, d_in)).sum().backward()
    assert calls == ([2] if forms_c2 else []), G.quic_forms(model, tokens)


def test_quality_suite_quick(tmp_path):
    """The method-comparison suite at toy budgets: runs, one results.json per run, a summary
    with mean ± std over seeds, the docs section, the Pareto and sweep plots."""
    import json

    from benchmarks.quality.__main__ import main as quality_main

    assert quality_main(["--quick", "--tasks", "minilm-bbc", "--entries", "lora", "quantum-peft",
                         "--seeds", "2", "--sweep", "--out", str(tmp_path), "--threads", "1"]) == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    assert len(data["rows"]) == 4 and len(data["summary"]) == 2
    ours = next(s for s in data["summary"] if s["entry"] == "quantum-peft")
    assert ours["seeds"] == 2 and ours["lr_source"].startswith("default for quantum-peft")
    assert ours["vs_lora"] is not None and ours["target_met"] in (True, False)
    for entry in ("lora", "quantum-peft"):
        for seed in (0, 1):
            assert (tmp_path / "minilm-bbc" / entry / f"seed{seed}" / "results.json").is_file()
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["sweep_lr"] for r in sweep["rows"]} == {1e-3, 3e-3, 1e-2}
    from benchmarks.quality import suite

    # what rendering adds to the default grid: the sweep's own folders (1e-2's run is the
    # suite's seed-0 run at the default rate, kept in its seed folder)
    assert suite.stored_rates(tmp_path) == {1e-3, 3e-3}
    doc = (tmp_path / "results.md").read_text()
    assert "<!-- quality-suite -->" in doc and "<!-- quality-sweep -->" in doc
    assert (tmp_path / "quality_pareto.png").stat().st_size > 0
    assert (tmp_path / "quality_lr.png").stat().st_size > 0
    # render-only runs nothing: the stored runs come back, the missing seed and entry stay out
    assert quality_main(["--quick", "--tasks", "minilm-bbc", "--entries", "lora", "quantum-peft",
                         "quic", "--seeds", "3", "--render-only", "--out", str(tmp_path),
                         "--threads", "1"]) == 0
    rendered = json.loads((tmp_path / "quality.json").read_text())
    assert [(s["entry"], s["seeds"]) for s in rendered["summary"]] == [
        ("lora", 2), ("quantum-peft", 2)]
    assert not (tmp_path / "minilm-bbc" / "quic").exists()
    assert not (tmp_path / "minilm-bbc" / "lora" / "seed2").exists()
    assert len(json.loads((tmp_path / "sweep.json").read_text())["rows"]) == 6
    # a run made under another default of the method (here: a stored init_lambda the current
    # default does not give) is stale, not reused: its fingerprint holds only the options given
    stored = tmp_path / "minilm-bbc" / "quantum-peft" / "seed1" / "results.json"
    record = json.loads(stored.read_text())
    record["peft_config"]["init_lambda"] = 0.0
    stored.write_text(json.dumps(record))
    assert quality_main(["--quick", "--tasks", "minilm-bbc", "--entries", "quantum-peft",
                         "--seeds", "2", "--render-only", "--out", str(tmp_path),
                         "--threads", "1"]) == 0
    rendered = json.loads((tmp_path / "quality.json").read_text())
    assert [(r["entry"], r["seed"]) for r in rendered["rows"]] == [("quantum-peft", 0)]


def test_quality_no_adapter_point(tmp_path):
    """The suite's no-adapter entry: on classification the fresh head alone trains (only its
    numbers trainable, the base frozen, the metric above an untrained head's chance level is not
    asserted at toy budgets); on causal-LM data the base model is evaluated once (one seed, no
    training, nothing trainable); both stored and read back like any run."""
    import json

    import torch

    from benchmarks.quality import baseline, suite

    entry = next(e for e in suite.ENTRIES if e.method == baseline.METHOD)
    tasks = suite.tasks_for(["minilm-bbc", "smollm2-shakespeare"], True)
    rows = suite.run_suite(tasks, [entry], 2, tmp_path, log=lambda s: None)
    assert [(r["task"], r["seed"]) for r in rows] == [
        ("minilm-bbc", 0), ("minilm-bbc", 1), ("smollm2-shakespeare", 0)]
    head, base = rows[0], rows[2]
    assert head["trainable"] == 384 * 5 + 5 and head["adapter"] == 0 and head["lr"] == entry.lr["minilm"]
    assert len(json.loads((tmp_path / "minilm-bbc" / "head-only" / "seed0" / "results.json")
                          .read_text())["losses"]) == 2
    assert base["trainable"] == 0 and base["lr_source"] == "no training"
    assert 1.0 < base["metric"] < 1e4  # a perplexity
    again = suite.run_suite(tasks, [entry], 2, tmp_path, log=lambda s: None, stored_only=True)
    assert [r["metric"] for r in again] == [r["metric"] for r in rows]
    layer = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    assert baseline.freeze_all_but(layer, ["1"]) == 8
    with pytest.raises(ValueError, match="nothing to train"):
        baseline.freeze_all_but(layer, ["classifier"])


def test_quality_reuse_compares_resolved_defaults():
    """What a stored run must match: the entry's config fields as the code resolves them now;
    a field missing from the stored config (added since) differs; fields resolved from the
    model at build time (None in a fresh config: QPA's sizes) are not compared; defaults that
    follow the run's placement (QPA's start beside a fresh head) resolve from the stored one."""
    from benchmarks.quality import suite

    qpa = next(e for e in suite.ENTRIES if e.name == "qpa")
    settings = suite.method_settings(qpa)
    assert settings["init_gain"] == 0.3 and "n_mlp" not in settings
    beside_head = suite.method_settings(qpa, {"modules_to_save": ["classifier"], "task_type": "SEQ_CLS"})
    assert beside_head["init_gain"] == 0.1
    assert not suite.is_current({**settings, "init_gain": 0.1}, settings)
    assert "target_modules" not in settings and "peft_version" not in settings
    assert suite.is_current({**settings, "n_mlp": 2048, "target_modules": ["q"]}, settings)
    assert not suite.is_current({**settings, "init_gain": 0.0}, settings)
    assert not suite.is_current({k: v for k, v in settings.items() if k != "init_gain"}, settings)
    lora_r1 = next(e for e in suite.ENTRIES if e.name == "lora-r1")
    assert suite.method_settings(lora_r1)["r"] == 1


def test_trainer_check_quick(tmp_path):
    """The swap-the-config check at toy budgets: a Trainer run (MiniLM) and an SFTTrainer run
    (SmolLM2 chats) per method, one JSON each with the task's metric, the docs section."""
    import json

    from benchmarks.quality.trainer import main as trainer_main

    assert trainer_main(["--quick", "--tasks", "minilm-bbc", "smollm2-bbc-sft", "--methods",
                         "lora", "quantum-peft", "--seeds", "1", "--out", str(tmp_path),
                         "--threads", "1"]) == 0
    sft = json.loads((tmp_path / "smollm2-bbc-sft" / "quantum-peft" / "seed0.json").read_text())
    assert 0.0 <= sft["exact_match"] <= 1.0 and len(sft["answers"]) == 8
    assert sft["config"]["peft_type"] == "QUANTUM_PEFT" and sft["trainable"] > 0
    cls = json.loads((tmp_path / "minilm-bbc" / "lora" / "seed0.json").read_text())
    assert 0.0 <= cls["accuracy"] <= 1.0 and cls["lr"] == 1e-3
    doc = (tmp_path / "results.md").read_text()
    assert "SFTTrainer`, learning rate 0.0002" in doc and "| quantum-peft |" in doc
    # render-only runs nothing: the stored runs are shown, the missing seed and method are not
    assert trainer_main(["--render-only", "--tasks", "minilm-bbc", "smollm2-bbc-sft",
                         "--methods", "lora", "quantum-peft", "qpa", "--seeds", "2",
                         "--out", str(tmp_path)]) == 0
    doc = (tmp_path / "results.md").read_text()
    assert "| qpa |" not in doc and doc.count("| quantum-peft |") == 2
    assert not (tmp_path / "minilm-bbc" / "qpa").exists()
    assert not (tmp_path / "minilm-bbc" / "lora" / "seed1.json").exists()


def test_trainer_check_reuses_runs_across_peft_versions():
    """A stored run of the swap-the-config check stays current when only the peft version that
    wrote its config differs (a peft upgrade dropped every stored row from the docs before);
    any training field differing still makes it stale."""
    from benchmarks.quality.trainer import TASKS, _config_record, same_config

    current = _config_record("qpa", TASKS["smollm2-bbc-sft"])
    assert same_config({**current, "peft_version": "0.0.1"}, current)
    assert same_config(current, {**current, "a_field_added_since": None})
    assert not same_config({**current, "init_gain": 0.1}, current)
    assert not same_config({k: v for k, v in current.items() if k != "init_gain"}, current)


def test_quality_jobs_match_one_process(tmp_path):
    """``--jobs 2``: the missing runs go to two worker processes and come back as the same rows,
    in the same order, as one process running them one after the other (1 thread each, so the
    arithmetic is the same); a stored run is read back, not handed to a worker; a chat task's
    data files are written once, before the workers start."""
    from benchmarks.quality import suite

    tasks = suite.tasks_for(["minilm-bbc", "smollm2-bbc-sft"], True)
    entry = next(e for e in suite.ENTRIES if e.name == "quantum-peft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = suite.run_suite(tasks[:1], [entry], 2, tmp_path / "one", log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    logged = []
    (tmp_path / "two").mkdir()
    # seed 1 already stored: only seed 0 (and the chat task's run) go to the workers
    import shutil

    shutil.copytree(tmp_path / "one" / "minilm-bbc" / "quantum-peft" / "seed1",
                    tmp_path / "two" / "minilm-bbc" / "quantum-peft" / "seed1")
    two = suite.run_suite(tasks, [entry], 2, tmp_path / "two", log=logged.append, jobs=2)
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in two[:2]] == [
        {k: v for k, v in r.items() if k not in drop} for r in one]
    assert [(r["task"], r["seed"]) for r in two] == [
        ("minilm-bbc", 0), ("minilm-bbc", 1), ("smollm2-bbc-sft", 0), ("smollm2-bbc-sft", 1)]
    assert len(logged) == 3 and all(line.startswith("[") for line in logged)
    assert sorted(p.name for p in (tmp_path / "two" / "data" / "smollm2-bbc-sft").iterdir()) == [
        "eval.jsonl", "train.jsonl"]
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        suite.run_suite(tasks, [entry], 1, tmp_path / "two", jobs=0)
