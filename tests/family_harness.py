"""PyTorch side of the family tests: whole causal LMs (transformers MambaForCausalLM / Mamba2ForCausalLM, fla
RetNetForCausalLM / GLAForCausalLM / TransformerForCausalLM, the last with PyTorch's own attention standing in for
flash-attn, a GPU package) with random weights, written with ``save_pretrained`` and run on given token ids, or read
back from a directory gla-jax wrote. A separate process (Triton interpreter on, as in baseline_harness.py).

    python tests/family_harness.py JOBS.json

JOBS.json is a list of jobs, each ``{"op": "create" | "reload", "kind": "mamba" | "mamba2" | "retnet" | "gla" |
"transformer", "dir": ..., "ids": [[int]], "out": npz path}`` plus, for "create", ``"config"`` (the PyTorch
config's kwargs) and ``"seed"``.
"create" builds the model, randomises it, ``save_pretrained(dir)`` and writes its float32 logits for ``ids``;
"reload" loads ``dir`` with ``from_pretrained`` and writes its logits and config (``config`` as JSON in the npz).

The module imports no torch; the tests use ``run_family_harness``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_harness import torch_side_available  # noqa: E402,F401 - re-exported for the tests


def run_family_harness(jobs: list[dict], work: Path, timeout: float = 900) -> None:
    """Runs this file on ``jobs`` (written to ``work/jobs.json``) with Triton's interpreter on."""
    work.mkdir(parents=True, exist_ok=True)
    spec = work / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.pop("XLA_FLAGS", None)
    # not the repository root: its kernels/ package would shadow the `kernels` module transformers imports
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(work))
    if proc.returncode != 0:
        raise RuntimeError(f"family harness failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------------------------
# torch side (only when run as a script)


def _classes(kind):
    if kind == "mamba":
        from transformers import MambaConfig, MambaForCausalLM

        return MambaConfig, MambaForCausalLM
    if kind == "mamba2":
        from transformers import Mamba2Config, Mamba2ForCausalLM

        return Mamba2Config, Mamba2ForCausalLM
    if kind == "retnet":
        from fla.models import RetNetConfig, RetNetForCausalLM

        return RetNetConfig, RetNetForCausalLM
    if kind == "gla":
        from fla.models import GLAConfig, GLAForCausalLM

        return GLAConfig, GLAForCausalLM
    if kind == "transformer":
        import fla.layers.attn as fla_attn
        from fla.models import TransformerConfig, TransformerForCausalLM

        if fla_attn.flash_attn_func is None:  # flash-attn is a GPU package: PyTorch's own attention stands in
            fla_attn.flash_attn_func = _causal_attention
        return TransformerConfig, TransformerForCausalLM
    raise SystemExit(f"family_harness: unknown kind {kind!r}")


def _causal_attention(q, k, v, *, causal, window_size=(-1, -1), **unused):
    """flash-attn's ``flash_attn_func`` contract on CPU (``[B, T, H, D]`` tensors, grouped kv heads, causal, no
    window) with ``torch.nn.functional.scaled_dot_product_attention``."""
    import torch

    if not causal or tuple(window_size) != (-1, -1) or unused:
        raise SystemExit(f"family_harness: attention stand-in supports causal, unwindowed calls only ({unused})")
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def _randomize(model, torch, seed):
    """O(1) activations through every parameter: norms near 1, biases and D of order 1, matrices ~ 1/sqrt(fan in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.split(".")[-1]
            r = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * r)
            elif last == "A_log":
                p.copy_(0.5 * r)
            elif last == "dt_bias" or name.endswith("dt_proj.bias"):
                p.copy_(0.5 * r - 1.0)
            elif last in ("D", "bias"):
                p.copy_(r)
            elif "embed" in name:
                p.copy_(r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)


def _logits(model, torch, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _main(spec: Path) -> None:
    from baseline_harness import _setup_torch

    torch = _setup_torch()
    import numpy as np

    for job in json.loads(spec.read_text()):
        config_class, model_class = _classes(job["kind"])
        if job["op"] == "create":
            torch.manual_seed(job.get("seed", 0))
            model = model_class(config_class(**job["config"])).float().eval()
            _randomize(model, torch, job.get("seed", 0))
            model.save_pretrained(job["dir"])
        else:
            model = model_class.from_pretrained(job["dir"], dtype=torch.float32).eval()
        logits = _logits(model, torch, job["ids"])
        np.savez(job["out"], logits=logits, config=json.dumps(model.config.to_dict(), default=str))
    print("ok")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    _main(Path(sys.argv[1]))
