"""Damaged checkpoints are moved aside (not deleted) and the run resumes exactly from the previous one, without
colliding with the moved step; another model's checkpoint is one line; orbax/asyncio noise stays hidden."""

import json

import pytest

from gla_jax.errors import UserError
from gla_jax.train import checkpoint as K
from gla_jax.train import checkpoint_guard as G
from gla_jax.train import config as C
from gla_jax.train import trainer as loop

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.num_hidden_layers=1", "model.vocab_size=320",
        "data.seq_len=32", "data.batch_size=2", "data.max_docs=20", "train.log_every=1", "train.eval_every=0",
        "train.progress=false", "train.sample_tokens=0", "checkpoint.every=2", "checkpoint.keep=5",
        "optim.warmup_steps=1", "mesh.data=1"]


def _run(wd, steps, *extra, log=None):
    cfg = C.load_config(None, TINY + [f"train.steps={steps}", *extra])
    return loop.Trainer(cfg, wd, log=log or (lambda *_: None)).run()


def _largest_file(d):
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_damaged_checkpoints_are_moved_aside_and_the_run_resumes(tmp_path, capsys):
    wd = tmp_path / "run"
    first = _run(wd, 6)["losses"]
    # 1) truncated parameter data in the newest step
    f = _largest_file(wd / "checkpoints" / "6" / "params")
    f.write_bytes(f.read_bytes()[:100])
    lines = []
    second = _run(wd, 6, log=lines.append)["losses"]
    out = capsys.readouterr()
    damaged = sorted((wd / "checkpoints" / "damaged").iterdir())
    assert len(damaged) == 1 and damaged[0].name.startswith("6-")
    assert (damaged[0] / "restore-error.txt").read_text().strip()
    assert (damaged[0] / "params").is_dir()  # kept, not deleted
    warn = [ln for ln in out.out.splitlines() if "damaged" in ln]
    assert len(warn) == 1 and "step 6" in warn[0] and str(damaged[0]) in warn[0]
    assert "Traceback" not in out.out + out.err and "Event loop is closed" not in out.out + out.err
    assert any("resumed" in ln and "step 4" in ln for ln in lines)
    assert sorted(second) == [5, 6]
    assert [second[s] for s in (5, 6)] == [first[s] for s in (5, 6)]  # exact resume from step 4
    assert K.Checkpointer(wd / "checkpoints").all_steps() == [2, 4, 6]

    # 2) a malformed data-iterator state in the newest step: also damage, not a KeyError
    (wd / "checkpoints" / "6" / "data" / "shard_0.json").write_text(json.dumps({"nonsense": 1}))
    third = _run(wd, 6)["losses"]
    assert sorted(third) == [5, 6] and [third[s] for s in (5, 6)] == [first[s] for s in (5, 6)]
    assert len(list((wd / "checkpoints" / "damaged").iterdir())) == 2

    # 3) another model's checkpoints are not damage: one line, nothing moved
    with pytest.raises(UserError) as e:
        _run(wd, 6, "model.hidden_size=64")
    assert "\n" not in str(e.value) and "another model" in str(e.value) and "(320, 32)" in str(e.value)
    assert K.Checkpointer(wd / "checkpoints").all_steps() == [2, 4, 6]
    assert len(list((wd / "checkpoints" / "damaged").iterdir())) == 2


def test_init_from_another_model_is_one_line(tmp_path, capfd):
    from gla_jax.cli.train import main

    src = tmp_path / "src"
    _run(src, 2)
    capfd.readouterr()
    rc = main(["--workdir", str(tmp_path / "new"), *TINY, "train.steps=2", "model.hidden_size=64",
               f"train.init_from={src}"])
    out, err = capfd.readouterr()
    assert rc == 2
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "train.init_from" in errors[0] and "another model" in errors[0], err
    assert "Traceback" not in out + err and "Event loop" not in out + err


class _FakeCheckpointer:
    """Steps as folders; ``restore`` fails for the steps in ``bad`` (as orbax does on damaged files)."""

    def __init__(self, directory, steps, bad):
        self.directory = directory
        self.bad = set(bad)
        for s in steps:
            (directory / str(s) / "params").mkdir(parents=True)
        self.manager = type("M", (), {"reload": lambda self: None})()

    def all_steps(self):
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def restore(self, step, *a):
        if step in self.bad:
            import sys
            print("Event loop is closed", file=sys.stderr)  # noise, as orbax's asyncio leaves behind
            raise RuntimeError(f"Encountered error while reading step {step}\nmore lines")
        return "params", "opt", {"step": step}, {"shard_0": {}}


def test_restore_newest_good_moves_damaged_steps_aside(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(G, "check_params_match", lambda *a: None)
    ck = _FakeCheckpointer(tmp_path, [10, 20, 30], bad=[30])
    lines = []
    verified = []
    got = G.restore_newest_good(ck, None, None, verify=verified.append, log=lines.append, is_main=True)
    assert got[0] == 20 and verified == [got]
    assert ck.all_steps() == [10, 20]
    (moved,) = (tmp_path / "damaged").iterdir()
    assert moved.name.startswith("30-") and (moved / "params").is_dir()
    assert "Encountered error while reading step 30" in (moved / "restore-error.txt").read_text()
    assert "Event loop is closed" in (moved / "restore-error.txt").read_text()
    assert len(lines) == 1 and "step 30" in lines[0] and "\n" not in lines[0] and str(moved) in lines[0]
    assert "Event loop" not in capsys.readouterr().err
    # a failing verify (e.g. a malformed data state) is damage too; nothing restorable -> None
    def bad_state(r):
        raise KeyError("nonsense")

    assert G.restore_newest_good(ck, None, None, verify=bad_state, log=lines.append, is_main=True) is None
    assert ck.all_steps() == [] and len(list((tmp_path / "damaged").iterdir())) == 3


def test_shape_differences_name_the_parameter():
    import numpy as np

    saved = G.shape_table({"model": {"emb": np.zeros((320, 32), np.float32), "w": np.zeros(3, np.float32)}})
    want = G.shape_table({"model": {"emb": np.zeros((320, 64), np.float32), "w": np.zeros(3, np.float32)}})
    assert G.shape_differences(saved, want) == ["model.emb: saved (320, 32) float32, expected (320, 64) float32"]
    assert G.shape_differences(saved, saved) == []
