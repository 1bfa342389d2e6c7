"""QPA's published parameter counts, as qpeft computes them (rows of ``python -m
benchmarks.param_counts``)."""

from __future__ import annotations

from qpeft.tuners._paper_counts import count_row, gemma2_2b, gpt2, meta_model, peft_lora_count


def paper_count_rows() -> list[dict]:
    from qpeft.tuners.counting import count_trainable
    from qpeft.tuners.qpa.config import QPAConfig
    from qpeft.tuners.qpa.generator import chunking

    rows: list[dict] = []
    p = "QPA"
    for name, mcfg, r, n_mlp, pub_n, pub_qpa, pub_lora, pub_pct in (
        ("GPT-2", gpt2(), 4, 2048, 7, 106264, 204100, "52.06%"),
        ("Gemma-2 (2B)", gemma2_2b(), 4, 4096, 8, None, None, "16.84%"),
    ):
        model = meta_model(mcfg, "AutoModelForCausalLM")
        total = sum(prm.numel() for prm in model.parameters())
        cfg = QPAConfig(preset="reference", r=r, n_mlp=n_mlp, depth=8, target_modules=["lm_head"])
        qpa = count_trainable(cfg, model).total
        lora = peft_lora_count(model, r, ["lm_head"])
        head = model.get_output_embeddings()
        m = r * (head.in_features + head.out_features)
        n_qubits = chunking(m, n_mlp)[1]
        rows.append(count_row(p, f"{name} lm_head r={r}: qubits N", n_qubits, pub_n,
                         f"generator.chunking(m={m:,}, n_mlp={n_mlp})"))
        rows.append(count_row(p, f"{name} lm_head r={r}, n_mlp={n_mlp}, L=8: QPA trainable", qpa,
                         pub_qpa, "count_trainable(QPAConfig(preset='reference'))"))
        rows.append(count_row(p, f"{name} lm_head LoRA r={r}", lora, pub_lora, "peft LoRA"))
        rows.append(count_row(p, f"{name}: QPA / LoRA", f"{100 * qpa / lora:.2f}%", pub_pct, "ratio",
                         "Gemma-2 size assumed 2B (hidden 2304); Gemma-1 2B (hidden 2048) "
                         "gives 16.85%" if "Gemma" in name else ""))
        for what, count, pub in (("LoRA", lora, {"GPT-2": "0.52%", "Gemma-2 (2B)": "0.19%"}),
                                 ("QPA", qpa, {"GPT-2": "0.27%", "Gemma-2 (2B)": "0.03%"})):
            rows.append(count_row(p, f"{name}: {what} as % of model parameters ({total:,})",
                             f"{100 * count / total:.2f}%", pub[name], "count / all params",
                             "the paper's percentage basis is not stated (lm_head-only "
                             "adapters); shown for completeness"))
    return rows
