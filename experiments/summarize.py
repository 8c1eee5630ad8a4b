"""Markdown tables of the committed results (``results/*.json``), for the README.

    python experiments/summarize.py                 # all experiments found in experiments/results
    python experiments/summarize.py --results DIR
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

from gla_jax.ops import registry  # noqa: E402


def _env_line(doc) -> str:
    env = doc["env"]
    pk = env["packages"]
    dev = env["device"]
    return (f"_{doc['finished'][:10]}, {dev['backend']} ({dev['device_kind']}, {dev['cpu_count']} CPUs), "
            f"jax {pk.get('jax')}, flax {pk.get('flax')}, seed {doc['seed']}, commit "
            f"{(env.get('git_commit') or '?')[:10]}; command `python experiments/{env['argv'][0]}"
            f"{' ' + ' '.join(env['argv'][1:]) if env['argv'][1:] else ''}`_")


def mqar(doc) -> str:
    rows = doc["results"]
    widths = sorted({r["width"] for r in rows})
    settings = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
    out = []
    for t, n in settings:
        table = []
        for m in dict.fromkeys(r["model"] for r in rows):
            d = {"model": m}
            for w in widths:
                hit = [r for r in rows if r["model"] == m and r["width"] == w and (r["seq_len"], r["num_kv_pairs"]) == (t, n)]
                d[f"width {w}"] = f"{hit[0]['test_acc']:.3f}" if hit else ""
            table.append(d)
        out.append(f"seq {t}, {n} pairs, accuracy on query positions:\n\n" + C.format_table(table))
    earlier = [f"{e['rows']} rows from an earlier run: `python experiments/{' '.join(e['argv'])}` "
               f"(commit {(e['git_commit'] or '?')[:10]}, finished {e['finished']})"
               for e in doc.get("extends", [])]  # rows kept from earlier runs joined by --extend, oldest first
    return "\n\n".join(earlier + out)


def gate_ablation(doc) -> str:
    rows = [{"variant": r["variant"], "heads": r["heads"], "params": r["params"], "train ppl": f"{r['train_ppl']:.3f}",
             "held-out ppl": f"{r['val_ppl']:.3f}", "paper train ppl (340M)": r["paper_train_ppl"]}
            for r in doc["results"]]
    return C.format_table(rows) + ("\n\nheld-out order (4 heads, best first): "
                                   + " < ".join(doc["held_out_order_4_heads"]))


def length_extrapolation(doc) -> str:
    table = {}
    for r in doc["results"]:
        if r.get("summary"):
            continue
        table.setdefault(f"{r['bucket_start']}-{r['bucket_end']}", {})[r["model"]] = (
            f"{r['ppl']:.3f}" if r["ppl"] is not None else "")
    return C.format_table([{"positions": k, **v} for k, v in table.items()])


def throughput(doc) -> str:
    rows = [{"model": r["model"], "seq len": r["seq_len"], "batch": r["batch"], "params": r["params"],
             "tokens/s": f"{r['tokens_per_sec']:.0f}", "step ms": f"{1e3 * r['step_seconds']:.0f}",
             "memory est. MiB": f"{r['peak_estimate_bytes'] / 2 ** 20:.0f}" if r["peak_estimate_bytes"] else ""}
            for r in doc["results"]]
    return C.format_table(rows)


def numerics(doc) -> str:
    """Worst relative error over the gate regimes, per form, dtype and length (the JSON has every row)."""
    groups = {}
    for r in doc["results"]:
        impl = registry.get(r["impl"]).name if r["impl"] in registry.choices() else r["impl"]  # "pallas" -> "triton"
        groups.setdefault((impl, r["dtype"], r["T"]), []).append(r)
    rows = []
    for (impl, dtype, T), rs in groups.items():
        d = {"impl": impl, "dtype": dtype, "T": T, "floor": f"{max(r.get('o_floor', float('nan')) for r in rs):.1e}"}
        for g in ("o", "dq", "dk", "dv", "dg"):
            vals = [r[f"{g}_err"] for r in rs if f"{g}_err" in r]
            if vals:
                worst = max(rs, key=lambda r: r.get(f"{g}_err", -1.0))
                d[g] = f"{max(vals):.1e}" + (f" ({worst['gate']})" if g == "dg" else "")
            else:
                d[g] = ""
        rows.append(d)
    rows.sort(key=lambda d: (d["dtype"], d["impl"], d["T"]))
    return ("worst relative RMS error over the gate regimes " + ", ".join(doc["config"]["gates"])
            + " (the regime of the worst dg in brackets):\n\n" + C.format_table(rows))


def kernel_resources(doc) -> str:
    """Per head size and dtype: the largest shared memory and register count, the spills and the slowest compile
    over the 7 kernels with and without packed documents (the JSON has every kernel)."""
    groups = {}
    for r in doc["results"]:
        groups.setdefault((r["K"], r["V"], r["dtype"]), []).append(r)
    rows = []
    for (K, V, dtype), rs in groups.items():
        slow = max(rs, key=lambda r: r["compile_s"])
        spilling = sorted({r["kernel"] for r in rs if r["spill_bytes"]})
        rows.append({"K": K, "V": V, "dtype": dtype, "max shared KiB": max(r["shared_kib"] for r in rs),
                     "max registers": max(r["registers"] for r in rs),
                     "spill bytes (kernels)": f"{max(r['spill_bytes'] for r in rs)} ({', '.join(spilling) or '-'})",
                     "slowest compile s": f"{slow['compile_s']} ({slow['kernel']})"})
    return (f"sm_{doc['config']['arch']}, per-block shared memory limit {doc['max_shared_bytes'] // 1024} KiB:\n\n"
            + C.format_table(rows))


def compare_models(doc) -> str:
    rows = doc["results"]
    fmt = lambda v: "" if v is None else f"{v:.3f}"
    main = [{"model": r["label"], "params": r["params"], "train ppl": fmt(r["train_ppl"]),
             "held-out ppl": fmt(r["val_ppl"]), f"ppl, last bucket ({r['buckets'][-1]['start']}-"
             f"{r['buckets'][-1]['end']})": fmt(r["eval_ppl_last_bucket"]), "MQAR acc": fmt(r.get("mqar_test_acc")),
             "paper Wikitext ppl (340M)": r.get("paper_wikitext_ppl_340m") or ""} for r in rows]
    table = {}
    for r in rows:
        for b in r["buckets"]:
            table.setdefault(f"{b['start']}-{b['end']}", {})[r["label"]] = fmt(b["ppl"])
    abl = [{"paper row": a["row"], "run": a["run"], "train ppl": fmt(a["train_ppl"]),
            "held-out ppl": fmt(a["val_ppl"]), "paper train ppl (340M)": a["paper_train_ppl"]}
           for a in doc.get("ablation", [])]
    variants = doc.get("gla_gate_variants")
    if variants:
        abl += [{"paper row": f"(GLA with gate={r['gate']})", "run": "gate_ablation.json, same settings",
                 "train ppl": fmt(r["train_ppl"]), "held-out ppl": fmt(r["val_ppl"]),
                 "paper train ppl (340M)": r["paper_train_ppl"]} for r in variants["rows"]]
    note = "" if doc.get("complete", True) else "\n\n**incomplete: the run stopped before every family finished**"
    return (C.format_table(main) + "\n\nheld-out order (best first): " + " < ".join(doc["held_out_order"])
            + "\n\nheld-out perplexity by position:\n\n" + C.format_table([{"positions": k, **v}
                                                                          for k, v in table.items()])
            + "\n\ngate ablation rows:\n\n" + C.format_table(abl) + note)


FORMATTERS = {"mqar": mqar, "compare_models": compare_models, "gate_ablation": gate_ablation, "length_extrapolation": length_extrapolation,
              "throughput": throughput, "numerics": numerics, "kernel_resources": kernel_resources}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=pathlib.Path, default=C.RESULTS_DIR)
    args = p.parse_args(argv)
    for path in sorted(args.results.glob("*.json")):  # <experiment>.json and later runs <experiment>_<label>.json
        name = path.stem
        fmt = next((f for k, f in FORMATTERS.items() if name == k or name.startswith(k + "_")), None)
        if fmt is None or name.endswith("_smoke"):
            continue
        doc = json.loads(path.read_text())
        plot = f"\n\n![{name}](results/{name}.png)" if path.with_suffix(".png").is_file() else ""
        print(f"### {name}\n\n{_env_line(doc)}\n\n{fmt(doc)}{plot}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
