"""orbax checkpoints: exact resume after SIGKILL (subprocess) and SIGTERM, unfinished checkpoints ignored, restore
onto another mesh, non-finite loss stops the run, save_params/load_params, and `gla-jax eval`."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gla_jax.train import checkpoint as K
from gla_jax.train import config as C
from gla_jax.train import trainer as loop
from gla_jax.train.metrics import by_step, read_metrics

BASE = ["model.hidden_size=32", "model.num_heads=2", "model.num_hidden_layers=1", "model.vocab_size=320",
        "data.seq_len=64", "data.batch_size=4", "data.max_docs=60", "train.steps=8", "train.log_every=1",
        "train.eval_every=0", "train.progress=false", "train.sample_tokens=0", "checkpoint.every=2",
        "optim.warmup_steps=2", "optim.lr=1e-2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1"]
REPO = Path(__file__).resolve().parent.parent


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run (checkpoints every 2 steps on a 2-device fsdp mesh)."""
    wd = tmp_path_factory.mktemp("reference")
    cfg = C.load_config(None, BASE)
    loop.save_resolved_config(cfg, wd)
    tr = loop.Trainer(cfg, wd, log=_quiet)
    out = tr.run()
    return wd, out, tr


def test_reference_run_writes_metrics_and_checkpoints(reference):
    wd, out, _ = reference
    recs = read_metrics(wd)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert key in recs[0]
    assert by_step(recs) == out["losses"]
    steps = K.Checkpointer(wd / "checkpoints").all_steps()
    assert steps == [4, 6, 8]  # keep the last 3
    assert (wd / "tensorboard").is_dir() and any((wd / "tensorboard").iterdir())


def _cli(wd, *extra, kill_at=None):
    """``gla-jax train`` in a subprocess; ``kill_at=(signal, step)``: a hook sends the process that signal right after
    that step (after the step's own hooks, e.g. its checkpoint save, have run)."""
    argv = ["--workdir", str(wd), *BASE, *extra]
    if kill_at is None:
        cmd = [sys.executable, "-m", "gla_jax.cli", "train", *argv]
    else:
        code = ("import os, sys\n"
                "from gla_jax.cli.train import main\n"
                f"def kill(info):\n    if info.step == {kill_at[1]}:\n        os.kill(os.getpid(), {int(kill_at[0])})\n"
                f"sys.exit(main({argv!r}, hooks=[(kill, 1)]))\n")
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _signal_at(step, sig=signal.SIGTERM):
    """A hook that sends this process ``sig`` right after ``step``."""
    def hook(info):
        if info.step == step:
            os.kill(os.getpid(), sig)
    return hook


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path):
    """Killed with SIGKILL right after step 7 (the step-6 save may still be in flight), resumed from the newest
    complete checkpoint: the recomputed steps equal the killed run's own (uninterrupted) losses bit for bit."""
    _, ref, _ = reference
    wd = tmp_path / "run"
    p = _cli(wd, kill_at=(signal.SIGKILL, 7))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    before = by_step(read_metrics(wd))
    assert sorted(before) == list(range(1, 8))
    done = K.Checkpointer(wd / "checkpoints").all_steps()
    assert done and max(done) <= 6
    # a checkpoint that was never finalized (as a crash mid-write leaves it) must not be loaded
    fake = wd / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"
    fake.mkdir(parents=True)
    (fake / "junk").write_text("partial")
    p = _cli(wd)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed_at = int(p.stdout.split("at step ")[1].split()[0])
    assert resumed_at in done and resumed_at < 7
    records = read_metrics(wd)
    after = {r["step"]: r["loss"] for r in records[len(before):]}
    assert sorted(after) == list(range(resumed_at + 1, 9))
    for s in range(resumed_at + 1, 8):
        assert after[s] == before[s], (s, after[s], before[s])  # bit-identical
    # and the whole curve is the in-process reference's (another process: equal to float32 rounding)
    np.testing.assert_allclose([after[8]] + [before[s] for s in range(1, 8)],
                               [ref["losses"][8]] + [ref["losses"][s] for s in range(1, 8)], rtol=1e-5)
    assert K.Checkpointer(wd / "checkpoints").latest_step() == 8


@pytest.mark.slow  # 63 s; the SIGKILL resume test covers bit-identical resume by default
def test_sigterm_saves_and_resume_matches(reference, tmp_path):
    _, ref, _ = reference
    cfg = C.load_config(None, BASE)
    tr = loop.Trainer(cfg, tmp_path, log=_quiet)
    tr.add_hook(_signal_at(3))
    out = tr.run()
    assert out["stopped_by_signal"] == "SIGTERM" and out["step"] == 3
    assert K.Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    out = loop.Trainer(cfg, tmp_path, log=_quiet).run()
    assert out["start_step"] == 3
    for s in range(4, 9):
        assert out["losses"][s] == ref["losses"][s]


def test_restore_onto_another_mesh(reference):
    wd, _, tr = reference
    final = jax.tree.map(np.asarray, jax.device_get(tr.params))
    cfg = C.load_config(None, BASE[:-3] + ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=4"])
    other = loop.Trainer(cfg, wd, log=_quiet)
    assert other.mesh.devices.size == 4
    ck = K.Checkpointer(wd / "checkpoints")
    params, opt_state, meta, data = ck.restore(8, other.abs_params, other.abs_opt, ["shard_0"])
    assert meta["step"] == 8 and "shard_0" in data
    leaves = jax.tree.leaves(params)
    assert all(x.sharding.mesh.devices.size == 4 for x in leaves)
    for a, b in zip(jax.tree.leaves(final), leaves):
        assert np.array_equal(a, np.asarray(b))
    # parameters only, for other tools
    p2 = K.load_params(wd)
    flat = jax.tree.leaves(p2)
    assert len(flat) == len(leaves) and all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(final),
                                                                                          flat))


def test_save_params_round_trip(reference, tmp_path):
    _, _, tr = reference
    K.save_params(tmp_path / "export", tr.params, config={"hidden_size": 32})
    back = K.load_params(tmp_path / "export", as_numpy=True)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["hidden_size"] == 32
    for a, b in zip(jax.tree.leaves(jax.device_get(tr.params)), jax.tree.leaves(back)):
        assert isinstance(b, np.ndarray) and np.array_equal(np.asarray(a), b)
    with pytest.raises(ValueError, match="^checkpoint_dir"):
        K.load_params(tmp_path / "nothing")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = C.load_config(None, BASE[:-3] + ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "optim.lr=1e12",
                                           "optim.warmup_steps=0", "optim.clip_norm=0", "optim.weight_decay=0",
                                           "checkpoint.every=1"])
    with pytest.raises(loop.TrainingError) as e:
        loop.Trainer(cfg, tmp_path, log=_quiet).run()
    msg = str(e.value)
    bad = int(msg.split("at step ")[1].split(";")[0])
    assert "non-finite" in msg and "last good checkpoint" in msg
    steps = K.Checkpointer(tmp_path / "checkpoints").all_steps()
    assert steps and max(steps) == bad - 1
    recs = by_step(read_metrics(tmp_path))
    assert all(np.isfinite(v) for v in recs.values())


def test_eval_cli(reference, capsys):
    from gla_jax.cli import main as gla_main
    from gla_jax.train.evaluate import bucket_edges, segment_offsets

    assert bucket_edges(64, 256) == [0, 64, 128, 256] and bucket_edges(64, 64) == [0, 64]
    seg = np.array([[1, 1, 1, 2, 2, 3]])
    assert segment_offsets(seg).tolist() == [[0, 1, 2, 0, 1, 0]]
    wd, _, _ = reference
    assert gla_main(["eval", "--workdir", str(wd), "--batches", "1", "--batch-size", "2"]) == 0
    path = wd / "eval" / "step8_len256_b1x2.json"
    res = json.loads(path.read_text())
    assert res["eval_seq_len"] == 256 and res["step"] == 8 and [b["start"] for b in res["buckets"]] == [0, 64, 128]
    assert np.isfinite(res["loss"]) and res["ppl"] == pytest.approx(np.exp(res["loss"]))
    assert "held-out loss" in capsys.readouterr().out
    # the same evaluation again is refused (nothing overwritten) unless --replace
    before = path.read_text()
    assert gla_main(["eval", "--workdir", str(wd), "--batches", "1", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--replace" in err and path.read_text() == before


@pytest.mark.parametrize("option, value", [("--batches", "0"), ("--seq-len", "1"), ("--seq-len", "-5"),
                                           ("--batch-size", "-1")])
def test_eval_refuses_degenerate_evaluations(reference, capsys, option, value):
    """An empty or degenerate evaluation is one line naming the option (exit 2), and writes nothing."""
    from gla_jax.cli import main as gla_main

    wd, _, _ = reference
    before = sorted(p.name for p in (wd / "eval").glob("*")) if (wd / "eval").exists() else []
    assert gla_main(["eval", "--workdir", str(wd), option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("gla-jax eval: error: " + option), err
    after = sorted(p.name for p in (wd / "eval").glob("*")) if (wd / "eval").exists() else []
    assert after == before


def test_resume_with_more_steps_says_what_the_learning_rate_does(reference, tmp_path):
    """train.steps 8 -> 10 on resume: one line with the rate before and after, from the cosine formula."""
    import math
    import shutil

    wd, _, _ = reference
    shutil.copytree(wd / "checkpoints", tmp_path / "checkpoints")
    lines = []
    cfg = C.load_config(None, [a for a in BASE if not a.startswith("train.steps")] + ["train.steps=10"])
    out = loop.Trainer(cfg, tmp_path, log=lines.append).run()
    assert out["start_step"] == 8 and sorted(out["losses"]) == [9, 10]
    note = [ln for ln in lines if ln.startswith("train.steps changed")]
    assert len(note) == 1, lines

    def lr(t, total, peak=1e-2, warm=2, end_ratio=0.1):  # linear warmup, cosine to end_ratio * peak
        if t < warm:
            return peak * t / warm
        frac = min((t - warm) / (total - warm), 1.0)
        return peak * end_ratio + (peak - peak * end_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    assert f"from {lr(7, 8):.2e} (step 8) to {lr(8, 10):.2e} (step 9)" in note[0], note[0]
    assert lr(7, 8) != lr(8, 10)


def test_zero_steps_prints_no_sample(tmp_path, capsys):
    """train.steps=0 trains nothing, so it prints a clear line instead of a sample from an untrained model."""
    from gla_jax.cli import main as gla_main

    argv = ["train", "--workdir", str(tmp_path), *[a for a in BASE if not a.startswith("train.")],
            "train.steps=0", "train.progress=false", "train.sample_tokens=8", "checkpoint.enabled=false"]
    assert gla_main(argv) == 0
    out = capsys.readouterr().out
    assert "--- sample" not in out and "no sample: the model has not been trained (train.steps=0)" in out


@pytest.mark.slow  # 69 s
def test_init_from_saved_params_starts_a_new_run_there(tmp_path):
    """A run started (seed 0) from the exported initial parameters of seed 5 trains exactly like seed 5 itself."""
    short = [a for a in BASE if not a.startswith(("train.steps", "checkpoint.every"))]
    short += ["train.steps=3", "checkpoint.enabled=false"]
    seeded = loop.Trainer(C.load_config(None, short + ["train.seed=5"]), tmp_path / "seed5", log=_quiet)
    K.save_params(tmp_path / "export", seeded.init_state()[0])
    want = seeded.run()["losses"]
    got = loop.Trainer(C.load_config(None, short + [f"train.init_from={tmp_path / 'export'}"]), tmp_path / "from",
                       log=_quiet).run()["losses"]
    plain = loop.Trainer(C.load_config(None, short), tmp_path / "plain", log=_quiet).run()["losses"]
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want)
    assert abs(plain[1] - want[1]) > 1e-4  # the seed matters, so the check above could fail
    wider = [a for a in short if not a.startswith("model.hidden_size")] + ["model.hidden_size=64"]
    with pytest.raises(ValueError, match="^train.init_from"):
        loop.Trainer(C.load_config(None, wider + [f"train.init_from={tmp_path / 'export'}"]), tmp_path / "bad",
                     log=_quiet).run()
