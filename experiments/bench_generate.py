"""Decoding speed and memory vs context length: GLA (O(1) recurrent state) vs Transformer++ (KV cache).

For each model and context length L the decoding cache is set to the state after an L-token context (synthetic
random contents: a decode step costs the same whatever the cache holds, and this skips an L-token prefill that
softmax attention could not even fit at 32K on a small machine), then ``--steps`` greedy tokens are decoded in one
compiled ``lax.fori_loop`` (compilation excluded; best of ``--repeats``). Reported: decode tokens/s, ms per step,
cache bytes, and XLA's peak-memory estimate of the compiled decode loop (parameters + cache + temporaries).

    python experiments/bench_generate.py                      # CPU default: gla-small vs transformer-small
    python experiments/bench_generate.py --gla gla-1.3b --transformer transformer-1.3b --dtype bfloat16  # GPU

Writes experiments/results/bench_generate.json and prints a Markdown table.

On CPU, XLA copies each layer's KV cache once per decode step around the in-place cache update (visible in the
compiled HLO), so Transformer++ decode there is slower than its attention arithmetic alone; GLA's per-step cost does
not depend on the context at all. The default (small CPU models, 1K/8K/32K) takes a few minutes on 2 cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--gla", default="gla-small", help="GLA preset")
    p.add_argument("--transformer", default="transformer-small", help="Transformer++ preset")
    p.add_argument("--contexts", default="1024,8192,32768", help="comma-separated context lengths")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded in parallel")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--vocab", type=int, default=0, help="override the presets' vocabulary size")
    return p


def synthetic_cache(model, batch, context, steps, key):
    """The decoding cache (the models' one cache protocol) after ``context`` tokens, with random contents: every
    per-layer array random; slot caches (``"segments"``) mark the first ``context`` slots filled."""
    import jax
    import jax.numpy as jnp

    cache = model.init_cache(batch, context + steps)
    leaves, tree = jax.tree.flatten(cache["layers"])
    keys = jax.random.split(key, len(leaves))
    leaves = [0.1 * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)]
    cache = {**cache, "layers": jax.tree.unflatten(tree, leaves), "index": jnp.asarray(context, jnp.int32)}
    if "segments" in cache:  # unfilled slots keep -1 and are never attended to
        cache["segments"] = cache["segments"].at[:, :context].set(1)
    return cache


def bench_one(model, kind, *, batch, context, steps, repeats, seed):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gla_jax.generate import cache_bytes, decode_step

    graphdef, state = nnx.split(model)
    cache = synthetic_cache(model, batch, context, steps, jax.random.key(seed))

    def loop(state, cache, tok):
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            tok, cache = carry
            logits, cache = decode_step(m, tok, cache)
            return jnp.argmax(logits, -1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, body, (tok, cache))

    tok = jnp.zeros((batch,), jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(loop).lower(state, cache, tok).compile()
    compile_s = time.perf_counter() - t0
    mem = common.memory_estimate(compiled)
    out = compiled(state, cache, tok)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, cache, tok))
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "model": kind, "context": context, "batch": batch, "steps": steps,
        "tokens_per_sec": batch * steps / best, "ms_per_step": 1e3 * best / steps,
        "cache_MiB": cache_bytes(cache) / 2**20,
        "peak_estimate_MiB": None if mem["peak_estimate_bytes"] is None else mem["peak_estimate_bytes"] / 2**20,
        "compile_s": compile_s,
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    common.refuse_overwrite(args.out, "bench_generate", args.replace or args.smoke)
    started = common.utc_now()
    import jax
    from flax import nnx

    from gla_jax.models import build_model, get_config

    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    steps, repeats = args.steps, args.repeats
    if args.smoke:
        contexts, steps, repeats = [c for c in contexts if c <= 1024][:1] or [256], 8, 1
    if not contexts or min(contexts) < 1:
        raise ValueError(f"--contexts: expected positive integers, got {args.contexts!r}")
    rows = []
    for kind, preset in (("gla", args.gla), ("transformer", args.transformer)):
        overrides = {"dtype": args.dtype}
        if args.vocab:
            overrides["vocab_size"] = args.vocab
        cfg = get_config(preset, **overrides)
        model = nnx.jit(lambda: build_model(cfg, rngs=nnx.Rngs(args.seed)))()
        for L in contexts:
            row = bench_one(model, kind, batch=args.batch, context=L, steps=steps, repeats=repeats, seed=args.seed)
            row["preset"] = preset
            rows.append(row)
            print(f"{preset:>20} context {L:>6}: {row['tokens_per_sec']:10.1f} tok/s  "
                  f"cache {row['cache_MiB']:.3f} MiB", flush=True)
    by = {(r["model"], r["context"]): r for r in rows}
    for r in rows:
        t = by.get(("transformer", r["context"]))
        if r["model"] == "gla" and t:
            r["speedup_vs_transformer"] = r["tokens_per_sec"] / t["tokens_per_sec"]
    cols = ["preset", "context", "tokens_per_sec", "ms_per_step", "cache_MiB", "peak_estimate_MiB",
            "speedup_vs_transformer"]
    print(common.format_table(rows, cols))
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(contexts=contexts, steps=steps, repeats=repeats, device=str(jax.devices()[0]))
    path = common.write_results("bench_generate", config=config, seed=args.seed, results=rows, out_dir=args.out,
                                started=started, replace=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
