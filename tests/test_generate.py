"""Generation: prefill + step-by-step decoding reproduces the teacher-forced forward at every position (GLA's
O(1) state and Transformer++'s KV cache), greedy output equals a naive float64 loop, padding, stop tokens, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_models as ref
from numpy_models import build
from gla_jax.generate import cache_bytes, decode_step, generate, left_align, prefill, sample_logits
from gla_jax.models import GLAConfig, GLAForCausalLM, TransformerConfig, build_model
from reference import rel_err

V = 40
CONFIGS = {
    "gla": GLAConfig(hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=V,
                     use_short_conv=True, impl="auto"),  # prefill: chunk on CPU; decode: recurrent
    "transformer": TransformerConfig(hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2,
                                     vocab_size=V),
}
_MODELS = {}


def model_for(kind):
    if kind not in _MODELS:
        _MODELS[kind] = build(lambda: build_model(CONFIGS[kind], rngs=nnx.Rngs(0)), scale=0.3)
    return _MODELS[kind]


_PREFILL = nnx.jit(lambda m, ids, valid: prefill(m, ids, valid, max_new_tokens=6))
_STEP = nnx.jit(decode_step)
_FULL = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg))


@pytest.mark.parametrize("kind", ["gla", "transformer"])
def test_prefill_then_decode_equals_teacher_forced_forward(kind):
    model = model_for(kind)
    rs = np.random.RandomState(0)
    prompts = [rs.randint(0, V, 5), rs.randint(0, V, 9)]
    cont = rs.randint(0, V, (2, 6))
    ids, valid = left_align(prompts)
    logits, cache = _PREFILL(model, jnp.asarray(ids), jnp.asarray(valid))
    steps = []
    for t in range(cont.shape[1]):
        step_logits, cache = _STEP(model, jnp.asarray(cont[:, t], jnp.int32), cache)
        steps.append(np.asarray(step_logits))
    steps = np.stack(steps, 1)  # [B, 6, V]
    # teacher-forced reference: each whole sequence in one call (left-padded rows, padding in its own segment)
    full_ids, full_valid = left_align([np.concatenate([p, c]) for p, c in zip(prompts, cont)])
    full_all = np.asarray(_FULL(model, jnp.asarray(full_ids), jnp.asarray(full_valid, jnp.int32)))
    for b, p in enumerate(prompts):
        full = full_all[b][full_valid[b]]
        got = np.concatenate([np.asarray(logits[b])[valid[b]], steps[b]], 0)
        assert got.shape == full.shape
        for t in range(full.shape[0]):  # every position
            assert rel_err(got[t], full[t]) < 1e-4, (b, t)


def test_gla_decoding_state_does_not_grow():
    model = model_for("gla")
    sizes = []
    for T in (8, 40):
        ids = jnp.zeros((1, T), jnp.int32)
        _, cache = jax.eval_shape(lambda i: prefill(model, i, jnp.ones_like(i, bool)), ids)
        sizes.append(cache_bytes(cache))
    assert sizes[0] == sizes[1]
    # per layer: state [B, H, Dk/H, Dv/H] float32 plus three conv tails [B, W-1, C] float32; one int32 index
    assert sizes[0] == 2 * (4 * 4 * 8 * 4 + 3 * (16 + 8 + 16) * 4) + 4
    t = model_for("transformer")
    kv = [cache_bytes(jax.eval_shape(lambda i: prefill(t, i, jnp.ones_like(i, bool), max_new_tokens=4),
                                     jnp.zeros((1, T), jnp.int32))[1]) for T in (8, 40)]
    assert kv[1] > kv[0]


def _naive_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(ref.causal_lm(model, np.asarray(seq)[None])[0, -1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("kind", ["gla", "transformer"])
def test_greedy_generation_matches_naive_loop_and_padding_sides(kind):
    model = model_for(kind)
    rs = np.random.RandomState(1)
    prompts = [list(rs.randint(0, V, 3)), list(rs.randint(0, V, 7))]
    out = generate(model, prompts, max_new_tokens=5)
    expected = [_naive_greedy(model, p, 5) for p in prompts]
    assert out.sequences() == expected and list(out.lengths) == [5, 5]
    # the same prompts as a right- and a left-padded array
    right = np.zeros((2, 7), np.int32)
    left = np.zeros((2, 7), np.int32)
    for b, p in enumerate(prompts):
        right[b, :len(p)] = p
        left[b, 7 - len(p):] = p
    for arr, side in ((right, "right"), (left, "left")):
        o = generate(model, arr, prompt_lengths=[3, 7], padding_side=side, max_new_tokens=5)
        assert o.sequences() == expected
    # stop tokens: row 0 stops at its second generated token, the rest of the row is padding
    stop = expected[0][1]
    o = generate(model, prompts, max_new_tokens=5, stop_tokens=[stop], pad_token_id=-1)
    assert o.sequences()[0] == expected[0][:2] and list(o.tokens[0, 2:]) == [-1, -1, -1]
    n1 = expected[1].index(stop) + 1 if stop in expected[1] else 5
    assert o.sequences()[1] == expected[1][:n1]


def test_sampling_rules():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.3, 0.2]] * 4000))
    key = jax.random.key(0)
    assert (sample_logits(key, logits) == 1).all()  # greedy
    assert (sample_logits(key, logits, temperature=1.0, top_k=1) == 1).all()

    def freqs(tok):
        return np.bincount(np.asarray(tok), minlength=4) / tok.shape[0]

    np.testing.assert_allclose(freqs(sample_logits(key, logits, temperature=1.0)), [0.1, 0.4, 0.3, 0.2], atol=0.03)
    np.testing.assert_allclose(freqs(sample_logits(key, logits, temperature=1.0, top_k=2)), [0, 4 / 7, 3 / 7, 0],
                               atol=0.03)
    # top_p = 0.5: 0.4 alone is short of 0.5, so {0.4, 0.3} is kept
    np.testing.assert_allclose(freqs(sample_logits(key, logits, temperature=1.0, top_p=0.5)), [0, 4 / 7, 3 / 7, 0],
                               atol=0.03)
    # temperature sharpens: T=0.5 squares the probabilities
    p2 = np.array([0.1, 0.4, 0.3, 0.2]) ** 2
    np.testing.assert_allclose(freqs(sample_logits(key, logits, temperature=0.5)), p2 / p2.sum(), atol=0.03)


def test_sampled_generation_is_reproducible_and_in_vocab():
    model = model_for("gla")
    kw = dict(max_new_tokens=4, temperature=1.0, top_k=10, top_p=0.9, seed=3, impl="recurrent")
    a = generate(model, [[1, 2, 3]], **kw)
    b = generate(model, [[1, 2, 3]], **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert ((a.tokens >= 0) & (a.tokens < V)).all()


def test_generate_bad_inputs():
    model = model_for("gla")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, np.zeros((2, 3), np.int32), prompt_lengths=[1, 4], max_new_tokens=2)
    with pytest.raises(ValueError, match="padding_side"):
        generate(model, np.zeros((2, 3), np.int32), padding_side="middle", max_new_tokens=2)
    with pytest.raises(ValueError, match="model"):
        generate(object(), [[1]], max_new_tokens=2)


def test_generate_cli_loads_saved_params(tmp_path, capsys):
    from gla_jax.cli.generate import main
    from gla_jax.train.load import load_model
    from gla_jax.train.checkpoint import save_params

    model = model_for("gla")
    values = jax.tree.map(lambda v: v.get_value(), nnx.state(model, nnx.Param),
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    save_params(tmp_path, values, config=CONFIGS["gla"].to_dict())
    config, loaded = load_model(str(tmp_path))
    assert config == CONFIGS["gla"]
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    expected = generate(model, [[1, 2, 3]], max_new_tokens=4).sequences()[0]
    assert main(["--checkpoint", str(tmp_path), "--ids", "1,2,3", "--max-new-tokens", "4", "--no-stop",
                 "--json", "--tokenizer", "byte"]) == 0
    import json

    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][0]
    assert json.loads(line)["ids"] == expected
    assert main(["--checkpoint", str(tmp_path / "missing"), "--ids", "1"]) == 2


@pytest.mark.slow
def test_bench_generate_smoke(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--gla", "gla-tiny", "--transformer", "transformer-tiny", "--contexts", "64",
                       "--steps", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench_generate.json").read_text())
    rows = {r["model"]: r for r in doc["results"]}
    assert set(rows) == {"gla", "transformer"} and all(r["tokens_per_sec"] > 0 for r in rows.values())
    assert rows["gla"]["cache_MiB"] < rows["transformer"]["cache_MiB"]
