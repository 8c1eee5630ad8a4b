"""``gla-jax generate``: sample text from a trained checkpoint (or a preset with random weights).

    gla-jax generate --checkpoint RUN_DIR --prompt "Once upon a time" --max-new-tokens 200 --temperature 0.8
    gla-jax generate --preset gla-tiny --prompt "hello" --max-new-tokens 20     # random weights: a smoke test

``--checkpoint`` accepts a training run directory (its newest checkpoint), a step folder, or a ``save_params``
folder (such as ``gla-jax convert --from-hf`` writes, any model family); the model config comes from
``model_config.json`` (written by training) or ``config.json`` found there or in a parent folder, the tokenizer from
the run's ``config.yaml`` (``data.tokenizer``) unless ``--tokenizer`` is given. Prompts are token ids with ``--ids``
(comma separated) instead of text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from gla_jax.cli import command, one_line
from gla_jax.errors import UserError


def _parser():
    p = argparse.ArgumentParser(prog="gla-jax generate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training run dir, step folder or save_params folder")
    src.add_argument("--preset", help="a model preset with random weights (e.g. gla-tiny)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--ids", action="append", default=[], help="prompt as comma-separated token ids (repeatable)")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the run's, else byte)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop-token", type=int, action="append", default=None,
                   help="stop id (repeatable; default: the tokenizer's end-of-sequence id)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype override")
    p.add_argument("--impl", default=None, help="GLA operator for the prefill (auto/chunk/triton/recurrent/...)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


@command("gla-jax generate")
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import numpy as np
    from flax import nnx

    from gla_jax.generate import generate
    from gla_jax.models import build_model, get_config
    from gla_jax.train.load import find_run_config, load_model
    from gla_jax.train.tokenizer import get_tokenizer

    if not args.prompt and not args.ids:
        raise UserError("--prompt or --ids: give at least one prompt")
    t0 = time.perf_counter()
    if args.preset:
        overrides = {"dtype": args.dtype} if args.dtype else {}
        try:
            config = get_config(args.preset, **overrides)
        except (KeyError, ValueError) as e:
            raise UserError(f"--preset: {one_line(e)}") from None
        model = nnx.jit(lambda: build_model(config, rngs=nnx.Rngs(args.seed)))()
        tok_spec = args.tokenizer or "byte"
    else:
        config, model = load_model(args.checkpoint, dtype=args.dtype)
        run = find_run_config(args.checkpoint)
        tok_spec = args.tokenizer or (run.data.tokenizer if run is not None else "byte")
    tok = get_tokenizer(tok_spec)
    if args.prompt and tok.vocab_size > config.vocab_size:
        raise UserError(f"--tokenizer: vocabulary {tok.vocab_size} exceeds the model's {config.vocab_size}")
    prompts = [list(map(int, tok.encode(t))) for t in args.prompt]
    for s in args.ids:
        try:
            prompts.append([int(x) for x in s.split(",") if x.strip()])
        except ValueError:
            raise UserError(f"--ids: expected comma-separated integers, got {s!r}") from None
    for p in prompts:
        if not p:
            raise UserError("--prompt: a prompt encodes to no tokens")
        if max(p) >= config.vocab_size or min(p) < 0:
            raise UserError(f"--ids: token ids must be in [0, {config.vocab_size})")
    stops = [] if args.no_stop else (args.stop_token if args.stop_token is not None else [tok.eos_id])
    t1 = time.perf_counter()
    try:  # generate() checks its arguments (the options below) with one-line ValueErrors
        out = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, stop_tokens=stops, seed=args.seed, impl=args.impl)
    except ValueError as e:
        raise UserError(one_line(e)) from None
    t2 = time.perf_counter()
    for p, seq in zip(prompts, out.sequences()):
        text = tok.decode(np.asarray(seq))
        if args.json:
            print(json.dumps({"prompt_ids": p, "ids": seq, "text": text}))
        else:
            print(tok.decode(np.asarray(p)) + text)
            print("---")
    n = int(out.lengths.sum())
    print(f"[{config.model_type}: {n} tokens in {t2 - t1:.2f}s including compilation; load {t1 - t0:.2f}s]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
