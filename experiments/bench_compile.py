"""Compile time of the library's train step vs depth: layers under ``jax.lax.scan`` (``scan_layers``, the default) vs
a Python loop over the same stacked parameters.

For each family, depth (default 4 and 24 layers of the same small width) and layer mode, the trainer's jitted train
step (loss, gradients, AdamW update: ``gla_jax.train.loop.Trainer``'s step, the one ``gla-jax train`` runs) is
lowered and compiled for abstract inputs; the table shows the seconds spent tracing+lowering and compiling and the
size of the lowered program. With scan, the program holds one layer whatever the depth, so compile time should stay
nearly flat; with the Python loop it grows with the number of layers.

    python experiments/bench_compile.py                      # gla and transformer, 4 vs 24 layers, width 64
    python experiments/bench_compile.py --layers 4 12 48 --families gla

Writes ``results/compile_time.json`` (refuses to overwrite an existing file unless ``--replace``).
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

NAME = "compile_time"


def _parser():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["gla", "transformer"], help="registered model families")
    p.add_argument("--layers", nargs="+", type=int, default=[4, 24], help="depths to compare")
    p.add_argument("--width", type=int, default=64, help="hidden size (same for every depth)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="compiles per setting (the minimum is reported)")
    return p


def compile_step(family: str, layers: int, scan: bool, args) -> dict:
    """Seconds to lower and to compile the trainer's train step for one setting, and the lowered program's size."""
    import jax
    from flax import nnx  # noqa: F401 - the trainer's dependency, imported before timing

    from gla_jax.train import config as train_config
    from gla_jax.train import trainer as loop

    over = [f"model.arch={family}", f"model.hidden_size={args.width}", f"model.num_heads={args.heads}",
            f"model.num_hidden_layers={layers}", "model.vocab_size=320", f"model.scan_layers={str(scan).lower()}",
            f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch}", "mesh.data=1",
            "checkpoint.enabled=false", "train.progress=false", f"train.seed={args.seed}"]
    cfg = train_config.load_config(None, over)
    best = None
    for _ in range(args.repeats):
        jax.clear_caches()
        with tempfile.TemporaryDirectory() as wd:
            trainer = loop.Trainer(cfg, wd, log=lambda *_: None)
        tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jax.numpy.int32, sharding=trainer.batch_sharding)
        with loop.mesh_context(trainer.mesh):
            t0 = time.perf_counter()
            lowered = trainer._train_step.lower(trainer.abs_params, trainer.abs_opt,
                                                {"tokens": tokens, "segment_ids": tokens})
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
        row = {"family": family, "layers": layers, "layer_mode": "scan" if scan else "loop",
               "lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
               "program_lines": len(lowered.as_text().splitlines()), "params": trainer.n_params}
        if best is None or row["total_s"] < best["total_s"]:
            best = row
    return best


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    name = NAME + ("_smoke" if args.smoke else "")
    if args.smoke:
        args.families, args.layers, args.width, args.seq_len, args.batch = args.families[:1], [1, 2], 32, 32, 2
    if min(args.layers) < 1:
        raise SystemExit(f"--layers: expected positive depths, got {args.layers}")
    C.refuse_overwrite(args.out, name, args.replace)
    started = C.utc_now()
    rows = []
    for family in args.families:
        for scan in (True, False):
            for layers in args.layers:
                row = compile_step(family, layers, scan, args)
                rows.append(row)
                print(f"{family:>12} {row['layer_mode']:>4} {layers:>3} layers: lower {row['lower_s']:6.2f}s "
                      f"compile {row['compile_s']:6.2f}s ({row['program_lines']} lines)", flush=True)
    lo, hi = min(args.layers), max(args.layers)
    by = {(r["family"], r["layer_mode"], r["layers"]): r for r in rows}
    for r in rows:  # growth of the total time from the shallowest to this depth, same family and mode
        r["vs_shallowest"] = r["total_s"] / by[(r["family"], r["layer_mode"], lo)]["total_s"]
    print()
    print(C.format_table(rows, ["family", "layer_mode", "layers", "params", "lower_s", "compile_s", "total_s",
                                "vs_shallowest", "program_lines"], floatfmt=".3g"))
    for family in args.families:
        s, l_ = by[(family, "scan", hi)], by[(family, "loop", hi)]
        print(f"{family}: {hi} vs {lo} layers: scan x{s['vs_shallowest']:.2f}, loop x{l_['vs_shallowest']:.2f} "
              f"total compile time")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "replace", "no_plot")}
    out = C.write_results(name, config=config, seed=args.seed, results=rows, out_dir=args.out, started=started)
    print(f"wrote {C.repo_relative(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
