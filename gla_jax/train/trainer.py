"""A training run: mesh, model, optimizer, sharded steps, data and checkpoints, wired to ``loop.Loop`` and the hooks
(docs/design.md §6).

The model is split into a static graph and float32 parameters; the train step (``step.make_train_step``) is one
``jax.jit`` with explicit in/out shardings that accumulates gradients over micro-batches, clips, and applies AdamW.
The loss is the mean next-token cross-entropy over positions whose next token is in the same packed document.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from gla_jax.train import checkpoint as ckpt_lib
from gla_jax.train import config as config_lib
from gla_jax.train import data as data_lib
from gla_jax.train import flops as flops_lib
from gla_jax.train import hooks as hooks_lib
from gla_jax.train import metrics as metrics_lib
from gla_jax.train import optim as optim_lib
from gla_jax.train import sharding as shard_lib
from gla_jax.train import step as step_lib
from gla_jax.train.loop import Loop
from gla_jax.train.model import build_model, model_config
from gla_jax.train.tokenizer import get_tokenizer

TrainingError = hooks_lib.TrainingError

# Activations; "heads" is what the GLA layer passes to the operator, which shard-maps kernel backends over it.
ACT_RULES = (("batch", ("data", "fsdp")), ("seq", None), ("embed", None), ("heads", "tensor"))


@contextlib.contextmanager
def mesh_context(mesh):
    """Mesh + logical activation rules (both act while tracing, and jit's cache keys on the mesh)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(nnx.logical_axis_rules(ACT_RULES))
        yield


class _GlobalBatches:
    """The process-local batch iterator seen as global sharded batches (``get_state``/``set_state`` pass through)."""

    def __init__(self, local, to_global):
        self.local, self.to_global = local, to_global

    def __iter__(self):
        return self

    def __next__(self):
        return self.to_global(next(self.local))

    def get_state(self):
        return self.local.get_state()


class Trainer:
    """Everything for one run: mesh, model, optimizer, data, checkpoints, metrics. ``run()`` trains; ``add_hook``
    adds a hook (``fn(StepInfo)``, see ``loop.py``) after the built-in ones."""

    def __init__(self, cfg: config_lib.Config, workdir: str | Path, *, devices=None, log=print):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.log = log
        self.is_main = jax.process_index() == 0
        self.extra_hooks: list[tuple] = []
        self.mesh = shard_lib.make_mesh(cfg.mesh, devices)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)
        self.mcfg = model_config(cfg, self.tokenizer.vocab_size)
        self.total_steps = cfg.train.steps
        self.tx = optim_lib.make_optimizer(cfg.optim, self.total_steps)
        self.schedule = optim_lib.learning_rate_schedule(cfg.optim, self.total_steps)

        # abstract model -> graph, parameter shardings from logical names
        abs_model = nnx.eval_shape(lambda: build_model(self.mcfg, cfg.train.seed))
        self.graphdef, abs_params, abs_rest = nnx.split(abs_model, nnx.Param, ...)
        self.rest_state = abs_rest if jax.tree.leaves(abs_rest) else None
        self.apply = step_lib.apply_fn(self.graphdef, self.rest_state)
        self.param_shardings = shard_lib.state_shardings(abs_params, self.mesh)
        self.abs_params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                       step_lib.raw_values(abs_params), self.param_shardings)
        abs_opt = jax.eval_shape(self.tx.init, self.abs_params)
        repl = shard_lib.replicated(self.mesh)
        self.opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abs_opt, self.param_shardings,
                                                   transform_non_params=lambda _: repl)
        self.abs_opt = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                    abs_opt, self.opt_shardings)

        B, T = cfg.data.batch_size, cfg.data.seq_len
        self.batch_sharding = NamedSharding(self.mesh, shard_lib.batch_spec(self.mesh, B))
        self.n_params = flops_lib.num_params(self.abs_params)
        self.flops_per_token = flops_lib.train_flops_per_token(self.mcfg, T)
        self.peak = flops_lib.peak_flops_per_device(jax.devices()[0], cfg.train.peak_flops)
        self._jit_steps()

    def _jit_steps(self):
        param_sh, opt_sh, repl = self.param_shardings, self.opt_shardings, shard_lib.replicated(self.mesh)
        batch_sh = {"tokens": self.batch_sharding, "segment_ids": self.batch_sharding}
        step = step_lib.make_train_step(self.apply, self.tx, grad_accum=self.cfg.optim.grad_accum,
                                        param_shardings=param_sh)
        self._train_step = jax.jit(step, in_shardings=(param_sh, opt_sh, batch_sh),
                                   out_shardings=(param_sh, opt_sh, repl), donate_argnums=(0, 1))
        self._eval_step = jax.jit(step_lib.make_eval_step(self.apply), in_shardings=(param_sh, batch_sh),
                                  out_shardings=repl)

        def init_all():
            params = step_lib.raw_values(nnx.state(build_model(self.mcfg, self.cfg.train.seed), nnx.Param))
            return params, self.tx.init(params)

        self._init_all = jax.jit(init_all, out_shardings=(param_sh, opt_sh))

    def train_step(self, state, batch):
        """One optimizer step on a global batch (dict of sharded ``tokens``/``segment_ids``):
        ``((params, opt_state), batch) -> ((params, opt_state), metrics)``."""
        with mesh_context(self.mesh):
            params, opt_state, metrics = self._train_step(*state, batch)
        return (params, opt_state), metrics

    def init_state(self):
        with mesh_context(self.mesh):
            return self._init_all()

    def load_initial_params(self, directory, params):
        """``params`` replaced by those saved in ``directory`` (same tree, shapes, dtypes and shardings)."""
        try:
            with mesh_context(self.mesh):
                return ckpt_lib.load_params(directory, params)
        except (ValueError, KeyError, FileNotFoundError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise config_lib.ConfigError(f"train.init_from: cannot start from {directory}: {first} (does the model "
                                         f"config match the one the parameters were saved with?)") from None

    def local_model(self, params):
        """The NNX model holding ``params`` gathered onto one device (for sampling after training)."""
        local = jax.device_put(jax.device_get(params), jax.devices()[0])
        return nnx.merge(self.graphdef, local) if self.rest_state is None else \
            nnx.merge(self.graphdef, local, self.rest_state)

    # -- data ------------------------------------------------------------------------------------------------

    def global_batch(self, local: dict) -> dict:
        """Process-local numpy rows -> global sharded arrays."""
        B, T = self.cfg.data.batch_size, self.cfg.data.seq_len
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v), (B, T))
                for k, v in local.items()}

    def make_data(self):
        tr, va = data_lib.list_documents(self.cfg.data, self.tokenizer)
        self.train_docs, self.val_docs = tr, va
        return data_lib.make_batches(self.cfg.data, tr, process_index=jax.process_index(),
                                     process_count=jax.process_count())

    def eval_batches(self, n: int):
        """The first ``n`` packed held-out batches (fixed, unshuffled)."""
        if not len(self.val_docs) or n <= 0:
            return []
        it = data_lib.make_batches(self.cfg.data, self.val_docs, process_index=jax.process_index(),
                                   process_count=jax.process_count(), shuffle=False, repeat=True)
        return [self.global_batch(next(it)) for _ in range(n)]

    def evaluate(self, params, batches) -> float | None:
        """Mean held-out loss over ``batches`` (None when there are none)."""
        if not batches:
            return None
        total, weight = 0.0, 0.0
        with mesh_context(self.mesh):
            for b in batches:
                sums = self._eval_step(params, b)
                total += float(sums["loss_sum"])
                weight += float(sums["weight"])
        return total / max(weight, 1.0)

    # -- the run ---------------------------------------------------------------------------------------------

    def add_hook(self, fn, *, every: int = 1) -> None:
        """A hook run after the built-in ones (see ``loop.Loop.add_hook``)."""
        self.extra_hooks.append((fn, every))

    def run(self) -> dict:
        """Trains to ``train.steps`` (resuming from the workdir's newest complete checkpoint). Returns a summary
        dict (losses by step, final eval loss, wall time, ...). Raises TrainingError on a non-finite loss."""
        cfg = self.cfg
        t_start = time.time()
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.make_data()
        ckptr = ckpt_lib.Checkpointer(self.workdir / "checkpoints", keep=cfg.checkpoint.keep,
                                      async_save=cfg.checkpoint.async_save) if cfg.checkpoint.enabled else None
        rng = jax.random.key(cfg.train.seed)
        start_step, tokens_before = 0, 0
        restored = None
        if ckptr is not None:
            with mesh_context(self.mesh):
                restored = ckptr.restore_latest(self.abs_params, self.abs_opt,
                                                data_keys=[f"shard_{s}" for s in data.shards],
                                                verify=lambda r: data.set_state(r[4]))  # bad data state = damaged
        if restored is not None:
            start_step, params, opt_state, meta, data_state = restored
            data.set_state(data_state)
            rng = jax.random.wrap_key_data(jnp.asarray(np.asarray(meta["rng"], dtype=np.uint32)))
            tokens_before = int(meta.get("tokens_seen", 0)) - start_step * cfg.data.batch_size * cfg.data.seq_len
            self.log(f"resumed from {ckptr.directory} at step {start_step}")
            note = schedule_change_note(meta.get("config"), cfg, start_step)
            if note and self.is_main:
                self.log(note)
        else:
            params, opt_state = self.init_state()
            if cfg.train.init_from:
                params = self.load_initial_params(cfg.train.init_from, params)
        if self.is_main:
            self.log(f"model: {self.mcfg.model_type} {self.n_params / 1e6:.2f}M parameters "
                     f"(D={self.mcfg.hidden_size}, layers={self.mcfg.num_hidden_layers}, heads={getattr(self.mcfg, 'num_heads', '-')}); "
                     f"mesh {dict(self.mesh.shape)}; batch {cfg.data.batch_size}x{cfg.data.seq_len} tokens; "
                     f"{len(self.train_docs)} train / {len(self.val_docs)} held-out documents")

        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        tokens_seen = lambda step: tokens_before + step * tokens_per_step  # noqa: E731
        writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_main)
        progress = metrics_lib.Progress(self.total_steps, start_step, enabled=cfg.train.progress and self.is_main
                                        and start_step < self.total_steps, log=self.log)
        checkpoint = None
        if ckptr is not None:
            meta = lambda step: {"step": step, "rng": np.asarray(jax.random.key_data(rng)).tolist(),  # noqa: E731
                                 "tokens_seen": tokens_seen(step), "data_shards": data.num_shards,
                                 "config": config_lib.to_dict(cfg)}
            checkpoint = hooks_lib.CheckpointHook(ckptr, meta, self.log, start_step if restored is not None else None)

        def kept():
            if checkpoint is None or checkpoint.last_saved is None:
                return "no checkpoint was saved"
            return f"the last good checkpoint is step {checkpoint.last_saved} in {ckptr.directory}"

        meter = hooks_lib.Meter(tokens_per_step, progress, kept)
        loop = Loop(self.train_step).add_hook(meter)
        loop.add_hook(hooks_lib.LogHook(meter, writer, progress, schedule=self.schedule, total_steps=self.total_steps,
                                        flops_per_token=self.flops_per_token, peak_flops=self.peak and
                                        self.peak * self.mesh.devices.size, tokens_seen=tokens_seen, t_start=t_start),
                      every=max(cfg.train.log_every, 1))
        evaluation = None
        if cfg.train.eval_every:
            held_out = []

            def evaluate(params):
                if not held_out:
                    held_out.extend(self.eval_batches(cfg.train.eval_batches))
                return self.evaluate(params, held_out)

            evaluation = hooks_lib.EvalHook(evaluate, writer, progress)
            loop.add_hook(evaluation, every=cfg.train.eval_every)
        if checkpoint is not None:
            loop.add_hook(checkpoint, every=cfg.checkpoint.every)
        if cfg.train.profile:
            first, last = config_lib.parse_profile(cfg.train.profile)
            loop.add_hook(hooks_lib.ProfileHook(self.workdir / "profile", first, last, self.log))
        for fn, every in self.extra_hooks:
            loop.add_hook(fn, every=every)

        stop = hooks_lib.StopFlag()
        state, step, reason = (params, opt_state), start_step, None
        try:
            with stop.installed():
                state, step, reason = loop.run(state, _GlobalBatches(data, self.global_batch), start_step,
                                               self.total_steps, stop=stop)
        finally:
            progress.close()
            writer.close()
            if ckptr is not None:
                ckptr.close()
        self.params = state[0]
        return {"start_step": start_step, "step": step, "losses": meter.losses,
                "eval_loss": evaluation.last if evaluation else None, "wall_time": time.time() - t_start,
                "stopped_by_signal": reason, "params": state[0], "n_params": self.n_params}


def schedule_change_note(saved: dict | None, cfg: config_lib.Config, step: int) -> str | None:
    """One line when a resumed run's ``train.steps`` differs from the checkpoint's, saying what the learning rate
    does: the cosine schedule is recomputed over the new length, so the rate at the resume step moves."""
    try:
        old_steps = int(saved["train"]["steps"])
    except (TypeError, KeyError, ValueError):
        return None
    if old_steps == cfg.train.steps:
        return None
    before = float(optim_lib.learning_rate_schedule(cfg.optim, old_steps)(max(step - 1, 0)))
    after = float(optim_lib.learning_rate_schedule(cfg.optim, cfg.train.steps)(step))
    end = cfg.optim.lr * cfg.optim.min_lr_ratio
    return (f"train.steps changed from {old_steps} to {cfg.train.steps}: the learning-rate schedule is recomputed for "
            f"{cfg.train.steps} steps, so the rate goes from {before:.2e} (step {step}) to {after:.2e} (step "
            f"{step + 1}) and decays to {end:.2e} at step {cfg.train.steps}")


def save_resolved_config(cfg, workdir, mcfg=None, *, is_main: bool = True) -> bool:
    """Checks that ``workdir`` may hold this run (one run per workdir: a resume keeps the saved settings) and writes
    ``config.yaml``/``model_config.json`` on the main process (``run_dir.prepare_run_dir``). True when resuming."""
    from gla_jax.train import run_dir

    return run_dir.prepare_run_dir(workdir, cfg, None if mcfg is None else mcfg.to_dict(), is_main=is_main)