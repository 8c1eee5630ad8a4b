"""One run per workdir: a resume with settings that change shapes/optimizer/data order is refused before anything is
written; bad workdirs and data paths are one line and leave nothing behind."""

import json

import pytest

from gla_jax.errors import UserError
from gla_jax.train import config as C
from gla_jax.train import run_dir as R

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.num_hidden_layers=1", "model.vocab_size=320",
        "data.seq_len=32", "data.batch_size=2", "data.max_docs=20", "train.steps=2", "train.log_every=1",
        "train.eval_every=0", "train.progress=false", "train.sample_tokens=0", "checkpoint.every=1",
        "optim.warmup_steps=1", "mesh.data=1"]


def _tree(path):
    """{relative path: bytes} of every file under ``path`` (to show nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_may_change_keys_are_known_config_keys():
    keys = set(R.flatten(C.to_dict(C.Config())))
    for allowed in R.MAY_CHANGE_ON_RESUME:
        if allowed.endswith(".*"):
            assert any(k.startswith(allowed[:-1]) for k in keys), allowed
        else:
            assert allowed in keys, allowed
    # the settings that fix shapes, optimizer and data order are not among them
    for fixed in ("model.hidden_size", "model.vocab_size", "optim.lr", "data.source", "data.batch_size",
                  "data.seq_len", "data.shuffle_seed", "data.val_fraction", "train.seed"):
        assert not R.may_change(fixed), fixed


def test_resume_with_changed_model_is_refused_and_nothing_is_written(tmp_path):
    wd = tmp_path / "run"
    cfg = C.load_config(None, TINY)
    assert R.prepare_run_dir(wd, cfg, {"hidden_size": 32}) is False
    (wd / "checkpoints" / "2").mkdir(parents=True)
    before = _tree(wd)
    # allowed changes: a longer run, other cadences, another mesh
    longer = C.load_config(wd / "config.yaml", ["train.steps=10", "checkpoint.every=5", "mesh.fsdp=2",
                                                "mesh.data=-1"])
    assert R.prepare_run_dir(wd, longer, {"hidden_size": 32}, is_main=False) is True
    wider = C.load_config(wd / "config.yaml", ["model.hidden_size=64", "optim.lr=1e-3"])
    with pytest.raises(UserError) as e:
        R.prepare_run_dir(wd, wider, {"hidden_size": 64})
    msg = str(e.value)
    assert "\n" not in msg and "model.hidden_size: 32 -> 64" in msg and "optim.lr" in msg
    assert "--workdir" in msg and "train.init_from" in msg
    assert _tree(wd) == before


def test_model_config_json_is_compared_too(tmp_path):
    wd = tmp_path / "run"
    cfg = C.load_config(None, TINY)
    R.prepare_run_dir(wd, cfg, {"hidden_size": 32, "remat": False, "rope_theta": 10000.0})
    (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')  # the run made progress
    # a preset/model-code change that gives another model for the same config keys
    with pytest.raises(UserError, match="rope_theta"):
        R.prepare_run_dir(wd, cfg, {"hidden_size": 32, "remat": False, "rope_theta": 500000.0})
    R.prepare_run_dir(wd, cfg, {"hidden_size": 32, "remat": True, "rope_theta": 10000.0})  # remat may change


def test_checkpoints_without_config_are_refused(tmp_path):
    wd = tmp_path / "run"
    (wd / "checkpoints" / "10").mkdir(parents=True)
    with pytest.raises(UserError, match="no config.yaml"):
        R.prepare_run_dir(wd, C.load_config(None, TINY))


def test_a_run_that_never_started_may_be_taken_over(tmp_path):
    """Only config files (the run stopped on a data error before step 1): nothing to protect, new settings pass."""
    wd = tmp_path / "run"
    R.prepare_run_dir(wd, C.load_config(None, TINY), {"hidden_size": 32})
    other = C.load_config(None, TINY + ["model.hidden_size=64"])
    assert R.prepare_run_dir(wd, other, {"hidden_size": 64}) is False
    assert C.load_config(wd / "config.yaml").model.overrides["hidden_size"] == 64


def test_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        R.prepare_run_dir(f, C.load_config(None, TINY))
    with pytest.raises(UserError, match="is a file"):
        R.prepare_run_dir(f / "sub", C.load_config(None, TINY))
    assert f.read_text() == "x"


def test_missing_data_path_leaves_nothing_behind(tmp_path):
    wd = tmp_path / "new" / "run"
    cfg = C.load_config(None, TINY + [f"data.source={tmp_path / 'nope' / '*.txt'}"])
    with pytest.raises(UserError, match="data.source"):
        R.prepare_run_dir(wd, cfg)
    assert not (tmp_path / "new").exists()


def test_unwritable_workdir_leaves_nothing_behind(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(R.tempfile, "mkstemp", refuse)
    wd = tmp_path / "a" / "b"
    with pytest.raises(UserError, match="cannot write there"):
        R.prepare_run_dir(wd, C.load_config(None, TINY))
    assert not (tmp_path / "a").exists()


def test_cli_refuses_a_changed_model_and_keeps_the_run(tmp_path, capsys):
    from gla_jax.cli.train import main

    wd = tmp_path / "run"
    assert main(["--workdir", str(wd), *TINY]) == 0
    capsys.readouterr()
    before = _tree(wd)
    assert json.loads((wd / "model_config.json").read_text())["hidden_size"] == 32
    assert main(["--workdir", str(wd), "model.hidden_size=64"]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "model.hidden_size" in errors[0] and "Traceback" not in err, err
    assert _tree(wd) == before
    # train longer: allowed
    assert main(["--workdir", str(wd), "train.steps=3"]) == 0
    assert "train.steps: 3" not in capsys.readouterr().err
    assert C.load_config(wd / "config.yaml").train.steps == 3
