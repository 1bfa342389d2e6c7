"""QuIC's published parameter counts, as qpeft computes them (rows of ``python -m
benchmarks.param_counts``)."""

from __future__ import annotations

from qpeft.tuners._paper_counts import (
    count_row,
    deberta_v3_base,
    llama_7b,
    meta_model,
    peft_lora_count,
    safe_row,
)


def paper_count_rows() -> list[dict]:
    from qpeft.tuners.quic.config import QuICConfig, block_plan, count_reference

    rows: list[dict] = []
    p = "QuIC"
    worked = [(768, 3, (1, 2), (22, 253, 3, 231, 484)), (768, 3, (1, 2, 3), (11, 231, 25, 55, 121)),
              (768, 8, (1, 2), (13, 91, 5, 78, 169)), (768, 8, (1, 2, 3), (8, 92, 4, 28, 64)),
              (1024, 1, (1, 2), (44, 990, 34, 946, 1936)), (4096, 1, (1, 2), (90, 4095, 1, 4005, 8100)),
              (4096, 1, (1, 2, 3), (29, 4089, 7, 406, 841))]
    for d, nb, orders, pub in worked:
        def plan_tuple(d=d, nb=nb, orders=orders) -> str:
            pl = block_plan(d, nb, orders)
            return str((pl.n, pl.d_comp, pl.pad, pl.n * (pl.n - 1) // 2, pl.n * pl.n))
        safe_row(rows, p, f"block plan d={d}, N={nb}, orders {set(orders)}: (n, d_comp, pad, "
              "n(n-1)/2, n²)", str(pub), "quic.config.block_plan", plan_tuple)

    deb = deberta_v3_base()

    def deberta(orders: list[int], nb: int, targets: list[str], num_labels: int,
                num_adapters: int = 1) -> dict[str, int]:
        cfg = QuICConfig(target_modules=targets, num_blocks=nb, orders=orders,
                         num_adapters=num_adapters, modules_to_save=["classifier"])
        model = meta_model(deb, "AutoModelForSequenceClassification", num_labels=num_labels)
        return count_reference(cfg, model)

    qv = ["query_proj", "value_proj"]
    c = deberta([1, 2], 3, qv, 2)
    rows.append(count_row(p, "DeBERTaV3-base C1⊕C2, N=3, query/value (reference n² convention)",
                     c["reference"], 34848, "count_reference on meta DebertaV2"))
    rows.append(count_row(p, "  same, free count N·n(n-1)/2 (what qpeft trains)", c["free"], None,
                     "count_trainable", "the paper's code stores dense n×n blocks"))
    rows.append(count_row(p, "  2-class head", c["modules_to_save"], 1538, "modules_to_save"))
    rows.append(count_row(p, "  adapter + head", c["reference"] + c["modules_to_save"], "0.04M",
                     "sum", "the paper's ≈ '0.03M' is the adapter alone (34,848); with the "
                     "head it is 36,386"))
    rows.append(count_row(p, "  adapter alone ≈ '0.03M'", c["reference"], "0.03M", "reference"))
    c4 = deberta([1, 2], 3, qv, 2, num_adapters=4)
    rows.append(count_row(p, "DeBERTaV3-base, four chained adapters", c4["reference"], 139392,
                     "count_reference(num_adapters=4)"))
    safe_row(rows, p, "DeBERTaV3-base LoRA r=8 baseline", "1.33M",
          "peft LoRA r=8 on every encoder linear (query/key/value_proj, all dense)",
          lambda: peft_lora_count(meta_model(deberta_v3_base()), 8,
                                  ["query_proj", "key_proj", "value_proj", "dense"]),
          "1.33M matches LoRA on all encoder linears; on query/value only it is 294,912")
    for orders, pub, label in (([1], 1770241, "C1"), ([1, 2], 33217, "C1⊕C2"),
                               ([1, 2, 3], 13057, "C1⊕C2⊕C3")):
        c = deberta(orders, 8, ["output.dense"], 1)
        rows.append(count_row(p, f"STS-B {label}, N=8 on 24 output.dense + regression head",
                         c["reference"] + c["modules_to_save"], pub,
                         "count_reference + classifier (num_labels=1)"))
    cfg = QuICConfig(target_modules=["q_proj", "v_proj"], num_blocks=4, orders=[1, 2])
    safe_row(rows, p, "LLaMA-7B C1⊕C2, N=4, q_proj/v_proj (reference n²)", 495616,
          "count_reference on meta LLaMA-7B",
          lambda: count_reference(cfg, meta_model(llama_7b()))["reference"])
    rows.append(count_row(p, "VTAB-1k DINOv2-large", None, "0.13M", "-",
                     "not computed: the paper does not state targets/blocks for this run"))
    return rows
