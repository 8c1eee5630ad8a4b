"""PyTorch/fla side of the parity tests, run as a separate process.

fla's Triton kernels run on CPU only through Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before triton is first imported, and Triton's autotuner benchmarks each candidate config with a GPU timer. So the
torch side never runs inside the pytest (JAX) process: the tests call this file as a script, which writes
safetensors checkpoints, token ids and reference outputs as .npy files into a folder.

    python tests/fla_harness.py make OUT        # fla models with random weights (PARITY_CONFIGS) + logits, op refs
    python tests/fla_harness.py logits DIR...   # load each DIR with fla (Auto* and GLAForCausalLM, same weights?):
                                                # logits of DIR/tokens.npy into DIR/fla_logits.npy
    python tests/fla_harness.py transformer-names CONFIG_JSON   # {tensor name: shape} of fla's
                                                # TransformerForCausalLM for that config (built, never run)

The module itself (without running it) imports no torch: the tests use ``fla_available``, ``run_harness`` and
``PARITY_CONFIGS`` from it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

# Small fla GLAConfig settings covering the options the converter maps. Each is built with random weights.
# attn_mode="fused_recurrent": fla's chunk kernel does not run in Triton's interpreter.
_COMMON = dict(num_hidden_layers=2, attn_mode="fused_recurrent", fuse_cross_entropy=False)
PARITY_CONFIGS = {
    # defaults of the paper's models, fused norm+gate (weights under attn.g_norm_swish_gate)
    "base": dict(hidden_size=64, num_heads=2, vocab_size=100, expand_k=0.5, **_COMMON),
    # short convolutions on q/k/v, tied embeddings, expand_k 1, unfused norm (attn.g_norm)
    "conv_tied": dict(hidden_size=64, num_heads=2, vocab_size=120, expand_k=1.0, use_short_conv=True,
                      tie_word_embeddings=True, fuse_norm=False, fuse_swiglu=False, **_COMMON),
    # grouped key/value heads (4 query heads share 2 kv heads), short conv, clamped gates
    "gqa_conv": dict(hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=256, expand_k=0.5,
                     use_short_conv=True, clamp_min=-0.05, fuse_norm=False, fuse_swiglu=False, **_COMMON),
    # grouped kv, tied, explicit intermediate size, other eps, expand_v 2
    "gqa_tied": dict(hidden_size=64, num_heads=4, num_kv_heads=1, vocab_size=100, expand_k=1.0, expand_v=2.0,
                     intermediate_size=96, norm_eps=1e-5, tie_word_embeddings=True, **_COMMON),
}
BATCH, SEQ = 1, 72  # SEQ > 64 crosses a chunk boundary of the chunkwise forms; kept small: the interpreter is slow

# Operator-level reference: shapes (B, T, H, K, V) of the naive_recurrent_gla cases.
OP_CASES = {"small": (2, 100, 2, 16, 32), "wide": (1, 70, 3, 32, 16)}


def fla_available() -> bool:
    """True when torch, triton, fla and transformers are installed (found without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "triton", "fla", "transformers"))


def run_harness(*args: str, timeout: float = 600) -> str:
    """Runs this file as a script with the Triton interpreter switched on; returns its stdout."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"fla harness {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# torch side (only when run as a script)


def _setup_torch():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("fla_harness: set TRITON_INTERPRET=1 before running (see run_harness)")
    import warnings

    warnings.filterwarnings("ignore")
    import triton.runtime.autotuner as autotuner

    # Autotuner._bench(self, *args, config, **meta) times a config on the GPU; on CPU every config "costs" the same
    # and the first one is taken.
    def _no_bench(self, *args, config, **meta):
        return [0.0, 0.0, 0.0]

    autotuner.Autotuner._bench = _no_bench
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    return torch


def _randomize(model, torch, seed: int) -> None:
    """Replaces fla's initialization (tiny std, unit norms, zero biases) by O(1)-output random weights so that every
    parameter, norms and biases included, visibly changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "g_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def _logits(model, torch, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _make(out: Path) -> None:
    torch = _setup_torch()
    import numpy as np
    from fla.models import GLAConfig, GLAForCausalLM
    from fla.ops.gla.naive import naive_recurrent_gla

    out.mkdir(parents=True, exist_ok=True)
    for i, (name, kwargs) in enumerate(PARITY_CONFIGS.items()):
        torch.manual_seed(i)
        model = GLAForCausalLM(GLAConfig(**kwargs)).float().eval()
        _randomize(model, torch, seed=100 + i)
        if model.config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
        tokens = np.random.default_rng(i).integers(0, kwargs["vocab_size"], size=(BATCH, SEQ)).astype(np.int32)
        d = out / name
        model.save_pretrained(d, safe_serialization=True)
        np.save(d / "tokens.npy", tokens)
        np.save(d / "logits.npy", _logits(model, torch, tokens))

    # operator level: fla's naive recurrence in float32 on [B, T, H, K] inputs
    for i, (name, (B, T, H, K, V)) in enumerate(OP_CASES.items()):
        rng = np.random.default_rng(1000 + i)
        q, k = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
        v = rng.standard_normal((B, T, H, V)).astype(np.float32)
        # log-sigmoid gates / 16 as in the layer, plus a few strong decays
        z = rng.standard_normal((B, T, H, K)).astype(np.float32) * 2
        g = (-np.logaddexp(0, -z) / 16 - (rng.random((B, T, H, K)) < 0.05) * 3).astype(np.float32)
        h0 = rng.standard_normal((B, H, K, V)).astype(np.float32)
        t = [torch.from_numpy(a) for a in (q, k, v, g)]
        o, s = naive_recurrent_gla(*t, output_final_state=True)
        o0, s0 = naive_recurrent_gla(*t, initial_state=torch.from_numpy(h0), output_final_state=True)
        np.savez(out / f"op_{name}.npz", q=q, k=k, v=v, g=g, h0=h0, o=o.numpy(), s=s.numpy(), o_h0=o0.numpy(),
                 s_h0=s0.numpy())
    (out / "done.json").write_text(json.dumps({"configs": list(PARITY_CONFIGS), "ops": list(OP_CASES)}))


def _load_logits(dirs: list[Path]) -> None:
    """Loads each dir with fla through AutoModelForCausalLM and GLAForCausalLM.from_pretrained (kernel forced to
    fused_recurrent, the one that runs in the interpreter), checks both hold the same weights, writes the logits and
    prints one JSON line per dir."""
    torch = _setup_torch()
    import numpy as np
    import fla  # noqa: F401  (registers the "gla" model type with transformers' Auto classes)
    from fla.models import GLAForCausalLM
    from transformers import AutoModelForCausalLM

    for d in dirs:
        tokens = np.load(d / "tokens.npy")
        auto = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_mode="fused_recurrent").eval()
        direct = GLAForCausalLM.from_pretrained(d, dtype=torch.float32, attn_mode="fused_recurrent").eval()
        a, b = auto.state_dict(), direct.state_dict()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        np.save(d / "fla_logits.npy", _logits(direct, torch, tokens))
        print(json.dumps({"dir": str(d), "auto_class": type(auto).__name__, "auto_equals_direct": same,
                          "tied": bool(direct.config.tie_word_embeddings),
                          "lm_head_is_embeddings": direct.lm_head.weight.data_ptr()
                          == direct.model.embeddings.weight.data_ptr()}))


def _transformer_names(config_json: str) -> None:
    """Prints the state-dict names and shapes of fla's TransformerForCausalLM for a config. fla's attention layer
    refuses to be built without flash-attn (a GPU package); the model is only built here, never run, so a stand-in
    for the missing function is enough."""
    _setup_torch()
    import fla.layers.attn as fla_attn
    from fla.models import TransformerConfig, TransformerForCausalLM

    if fla_attn.flash_attn_func is None:
        fla_attn.flash_attn_func = fla_attn.flash_attn_varlen_func = lambda *a, **k: None
    model = TransformerForCausalLM(TransformerConfig(**json.loads(config_json)))
    print(json.dumps({k: list(v.shape) for k, v in model.state_dict().items()}))


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("make", "logits", "transformer-names") or (
            sys.argv[1] in ("make", "transformer-names") and len(sys.argv) != 3):
        raise SystemExit(__doc__)
    if sys.argv[1] == "transformer-names":
        _transformer_names(sys.argv[2])
    elif sys.argv[1] == "make":
        _make(Path(sys.argv[2]))
    else:
        _load_logits([Path(a) for a in sys.argv[2:]])
