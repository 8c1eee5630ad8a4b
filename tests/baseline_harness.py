"""PyTorch side of the baseline-layer parity tests (fla MultiScaleRetention, transformers MambaMixer/Mamba2Mixer),
run as a separate process with Triton's interpreter on (fla's kernels run on CPU only that way; see fla_harness.py).

    python tests/baseline_harness.py OUT      # every case of CASES: OUT/<name>.npz with the layer's state dict
                                              # (keys "w.<name>"), the input x and the PyTorch output y

The module itself imports no torch: the tests use ``CASES``, ``torch_side_available`` and ``run_baseline_harness``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

# name -> (kind, constructor kwargs, (batch, seq)). seq > 16 crosses chunk boundaries of the JAX forms (the tests use
# chunk_size 16); the torch side: fla's fused_recurrent kernel (the one that runs in the interpreter), transformers'
# pure-PyTorch paths (its Mamba2 chunk size is set small so that its own chunked scan is exercised too).
CASES = {
    "retnet_base": ("retnet", dict(hidden_size=64, num_heads=2, expand_k=1.0, expand_v=2.0), (2, 40)),
    "retnet_conv_gqa": ("retnet", dict(hidden_size=64, num_heads=4, num_kv_heads=2, expand_k=1.0, expand_v=1.0,
                                       use_short_conv=True, conv_size=4, fuse_norm=False, feature_map="swish"),
                        (1, 37)),
    "retnet_nogate": ("retnet", dict(hidden_size=32, num_heads=2, expand_k=0.5, expand_v=1.0, use_output_gate=False,
                                     norm_eps=1e-6), (2, 33)),
    "retnet_sigmoid_gate": ("retnet", dict(hidden_size=48, num_heads=3, expand_k=1.0, expand_v=2.0, gate_fn="sigmoid",
                                           fuse_norm=False, elementwise_affine=False), (1, 20)),
    "mamba_base": ("mamba", dict(hidden_size=32, state_size=8, expand=2, conv_kernel=4), (2, 40)),
    "mamba_bias_rank": ("mamba", dict(hidden_size=48, state_size=16, expand=2, conv_kernel=3, time_step_rank=5,
                                      use_bias=True, use_conv_bias=False), (1, 70)),
    "mamba2_groups": ("mamba2", dict(hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2, expand=2,
                                     conv_kernel=4, chunk_size=16), (2, 40)),
    "mamba2_bias_limit": ("mamba2", dict(hidden_size=48, num_heads=6, head_dim=16, state_size=16, n_groups=1,
                                         expand=2, conv_kernel=3, use_bias=True, use_conv_bias=False,
                                         time_step_limit=(0.0, 0.8), layer_norm_epsilon=1e-6, chunk_size=16),
                          (1, 37)),
}


def torch_side_available() -> bool:
    """True when torch, triton, fla and transformers are installed (found without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "triton", "fla", "transformers"))


def run_baseline_harness(out: Path, timeout: float = 900) -> dict:
    """Runs this file as a script (Triton interpreter on) writing OUT/<case>.npz; returns its JSON summary."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline harness failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# torch side (only when run as a script)


def _setup_torch():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("baseline_harness: set TRITON_INTERPRET=1 before running (see run_baseline_harness)")
    import warnings

    warnings.filterwarnings("ignore")
    import triton.runtime.autotuner as autotuner

    def _no_bench(self, *args, config, **meta):  # the autotuner's GPU timer: every config "costs" the same
        return [0.0, 0.0, 0.0]

    autotuner.Autotuner._bench = _no_bench
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    return torch


def _randomize(layer, torch, seed):
    """O(1)-output random weights, so that every parameter (norm weights and biases included) shows in y."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * r)
            elif name == "A_log":
                p.copy_(0.5 * r)
            elif name in ("dt_bias", "dt_proj.bias"):
                p.copy_(0.5 * r - 1.0)
            elif name == "D" or name.endswith(".bias"):
                p.copy_(r)
            elif "conv1d" in name:
                p.copy_(r / p.shape[-1] ** 0.5)
            else:  # Linear [out, in]
                p.copy_(r / p.shape[-1] ** 0.5)


def _build(kind, kwargs, torch):
    if kind == "retnet":
        from fla.layers import MultiScaleRetention

        return MultiScaleRetention(mode="fused_recurrent", **kwargs)
    if kind == "mamba":
        from transformers import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer

        kwargs = dict(kwargs)
        if "time_step_rank" not in kwargs:
            kwargs["time_step_rank"] = "auto"
        cfg = MambaConfig(num_hidden_layers=1, vocab_size=16, use_mambapy=False, **kwargs)
        return MambaMixer(cfg, layer_idx=0)
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = Mamba2Config(num_hidden_layers=1, vocab_size=16, **kwargs)
    return Mamba2Mixer(cfg, layer_idx=0)


def _main(out: Path) -> None:
    torch = _setup_torch()
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for i, (name, (kind, kwargs, (B, T))) in enumerate(CASES.items()):
        torch.manual_seed(i)
        layer = _build(kind, kwargs, torch).float().eval()
        _randomize(layer, torch, 100 + i)
        x = np.random.default_rng(i).standard_normal((B, T, kwargs["hidden_size"])).astype(np.float32)
        with torch.no_grad():
            y = layer(torch.from_numpy(x))
        y = (y[0] if isinstance(y, tuple) else y).float().numpy()
        weights = {f"w.{k}": v.detach().float().numpy() for k, v in layer.state_dict().items()}
        np.savez(out / f"{name}.npz", x=x, y=y, **weights)
        summary[name] = {"weights": sorted(k[2:] for k in weights), "y_rms": float(np.sqrt(np.mean(y ** 2)))}
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    _main(Path(sys.argv[1]))
