"""The sharded train step and the training loop (init or resume, log, evaluate, checkpoint, stop cleanly).

The model is split into a static graph and float32 parameters; the train step is one ``jax.jit`` with explicit
in/out shardings that runs gradient accumulation as a ``lax.scan`` over micro-batches, clips, and applies AdamW. The
loss is the mean next-token cross-entropy over positions whose next token is in the same packed document.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
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
from gla_jax.train import metrics as metrics_lib
from gla_jax.train import optim as optim_lib
from gla_jax.train import sharding as shard_lib
from gla_jax.train.tokenizer import get_tokenizer


def _test_signal():
    """Test hook: ``GLA_JAX_TEST_SIGNAL=NAME:STEP`` (e.g. ``SIGKILL:5``) makes the run send itself that signal right
    after step STEP (after that step's checkpoint save has started)."""
    spec = os.environ.get("GLA_JAX_TEST_SIGNAL", "")
    if not spec:
        return None
    name, step = spec.split(":")
    return getattr(signal, name), int(step)


_TEST_SIGNAL = _test_signal()


class TrainingError(RuntimeError):
    """The run stopped (non-finite loss); the message says why and which checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------------------
# model config

def model_config(cfg: config_lib.Config, tokenizer_vocab: int | None = None):
    """The model config for ``cfg.model`` (``model.arch``: a registered family; preset + overrides);
    ``train.compute_dtype`` and ``train.remat`` fill ``dtype``/``remat`` unless set explicitly. ConfigError naming
    ``model.<key>``."""
    from gla_jax.models.registry import PRESETS, config_field_types, get_config, get_family

    try:
        cls = get_family(cfg.model.arch).config_class
    except ValueError as e:
        raise config_lib.ConfigError(f"model.arch: {e}") from None
    ov = dict(cfg.model.overrides)
    if cfg.model.preset:
        if cfg.model.preset not in PRESETS:
            raise config_lib.ConfigError(f"model.preset: unknown preset {cfg.model.preset!r} "
                                         f"(known: {', '.join(sorted(PRESETS))})")
        cls = PRESETS[cfg.model.preset][0]
        expected = cls.model_type
        if cfg.model.arch != expected:
            raise config_lib.ConfigError(f"model.arch: preset {cfg.model.preset!r} is a {expected} model, "
                                         f"but model.arch is {cfg.model.arch!r}")
    type_hints = hints = config_field_types(cls)
    for key, value in list(ov.items()):
        if key not in hints:
            raise config_lib.ConfigError(f"model.{key}: unknown key for {cls.__name__}")
        ov[key] = config_lib.coerce(f"model.{key}", value, type_hints[key])
    ov.setdefault("dtype", cfg.train.compute_dtype)
    ov.setdefault("remat", cfg.train.remat)
    try:
        mcfg = get_config(cfg.model.preset, **ov) if cfg.model.preset else cls(**ov)
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"model: {e}") from None
    if tokenizer_vocab is not None and mcfg.vocab_size < tokenizer_vocab:
        raise config_lib.ConfigError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's "
                                     f"vocabulary ({tokenizer_vocab})")
    return mcfg


def build_model(mcfg, seed: int):
    from gla_jax.models import build_model as _build

    return _build(mcfg, rngs=nnx.Rngs(seed))


# ----------------------------------------------------------------------------------------------------------------
# loss and steps

def token_loss(logits, tokens, segment_ids):
    """(sum of next-token NLL over valid positions, number of valid positions); float32 scalars.

    logits: [B, T, V] float32; tokens, segment_ids: [B, T] int32. Position t is valid when token t+1 belongs to
    the same document (same nonzero segment id)."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    mask = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1).astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (logz - picked) * mask
    return nll.sum(), mask.sum()


def _position_nll(logits, tokens, segment_ids):
    """Per-position NLL [B, T] and validity mask [B, T] (for bucketed evaluation)."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    mask = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1).astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return nll * mask, mask


ACT_RULES = (("batch", ("data", "fsdp")), ("seq", None), ("embed", None))


@contextlib.contextmanager
def mesh_context(mesh):
    """Mesh + logical activation rules + the shard-mapped GLA operator (all act while tracing)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(nnx.logical_axis_rules(ACT_RULES))
        stack.enter_context(shard_lib.use_sharded_gla(mesh))
        yield


class Trainer:
    """Everything for one run: mesh, model, optimizer, data, checkpoints, metrics. ``run()`` trains."""

    def __init__(self, cfg: config_lib.Config, workdir: str | Path, *, devices=None, log=print):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.log = log
        self.is_main = jax.process_index() == 0
        self.mesh = shard_lib.make_mesh(cfg.mesh, devices)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)
        self.mcfg = model_config(cfg, self.tokenizer.vocab_size)
        self.total_steps = cfg.train.steps
        self.tx = optim_lib.make_optimizer(cfg.optim, self.total_steps)
        self.schedule = optim_lib.learning_rate_schedule(cfg.optim, self.total_steps)

        # abstract model -> graph, parameter shardings from logical names
        abs_model = nnx.eval_shape(lambda: build_model(self.mcfg, cfg.train.seed))
        self.graphdef, abs_params, abs_rest = nnx.split(abs_model, nnx.Param, ...)
        self.param_shardings = shard_lib.state_shardings(abs_params, self.mesh)
        self.abs_params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                       _values(abs_params),
                                       self.param_shardings)
        self.rest_state = None if not jax.tree.leaves(abs_rest) else abs_rest
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
        self._build_steps()

    # -- jitted functions -----------------------------------------------------------------------------------

    def _apply(self, params, tokens, segment_ids):
        model = nnx.merge(self.graphdef, params) if self.rest_state is None else \
            nnx.merge(self.graphdef, params, self.rest_state)
        return model(tokens, segment_ids=segment_ids)

    def _build_steps(self):
        accum = self.cfg.optim.grad_accum
        tx = self.tx
        param_sh = self.param_shardings

        def loss_fn(params, tokens, seg):
            logits = self._apply(params, tokens, seg)
            s, n = token_loss(logits, tokens, seg)
            return s, n

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def train_step(params, opt_state, tokens, seg):
            if accum == 1:
                (lsum, n), grads = grad_fn(params, tokens, seg)
            else:
                B, T = tokens.shape
                # micro-batch i takes rows i, i+accum, ... so every device holds rows of every micro-batch
                mt = tokens.reshape(B // accum, accum, T).swapaxes(0, 1)
                ms = seg.reshape(B // accum, accum, T).swapaxes(0, 1)
                zeros = jax.tree.map(jnp.zeros_like, params)
                zeros = jax.lax.with_sharding_constraint(zeros, param_sh)

                def body(carry, xs):
                    g_acc, l_acc, n_acc = carry
                    (l, c), g = grad_fn(params, xs[0], xs[1])
                    g_acc = jax.tree.map(jnp.add, g_acc, g)
                    return (g_acc, l_acc + l, n_acc + c), None

                (grads, lsum, n), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), (mt, ms))
            denom = jnp.maximum(n, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            grads = jax.lax.with_sharding_constraint(grads, param_sh)
            grad_norm = optax.global_norm(grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, {"loss": lsum / denom, "grad_norm": grad_norm, "tokens": n}

        repl = shard_lib.replicated(self.mesh)
        bsh = self.batch_sharding
        self._train_step = jax.jit(train_step, in_shardings=(param_sh, self.opt_shardings, bsh, bsh),
                                   out_shardings=(param_sh, self.opt_shardings, repl), donate_argnums=(0, 1))

        def eval_step(params, tokens, seg):
            return token_loss(self._apply(params, tokens, seg), tokens, seg)

        self._eval_step = jax.jit(eval_step, in_shardings=(param_sh, bsh, bsh), out_shardings=(repl, repl))

        def init_params():
            model = build_model(self.mcfg, self.cfg.train.seed)
            return _values(nnx.state(model, nnx.Param))

        def init_all():
            params = init_params()
            return params, tx.init(params)

        self._init_params = jax.jit(init_params, out_shardings=param_sh)
        self._init_all = jax.jit(init_all, out_shardings=(param_sh, self.opt_shardings))

    def train_step(self, params, opt_state, batch):
        """One optimizer step on a global batch (dict of sharded ``tokens``/``segment_ids``)."""
        with mesh_context(self.mesh):
            return self._train_step(params, opt_state, batch["tokens"], batch["segment_ids"])

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
            raise ValueError(f"train.init_from: cannot start from {directory}: {first} (does the model config match "
                             f"the one the parameters were saved with?)") from None

    # -- data ------------------------------------------------------------------------------------------------

    def global_batch(self, local: dict) -> dict:
        """Process-local numpy rows -> global sharded arrays."""
        B, T = self.cfg.data.batch_size, self.cfg.data.seq_len
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v), (B, T))
                for k, v in local.items()}

    def make_data(self):
        tr, va = data_lib.list_documents(self.cfg.data, self.tokenizer)
        self.train_docs, self.val_docs = tr, va
        it = data_lib.make_batches(self.cfg.data, tr, process_index=jax.process_index(),
                                   process_count=jax.process_count())
        return it

    def eval_batches(self, n: int):
        """The first ``n`` packed held-out batches (fixed, unshuffled)."""
        if not len(self.val_docs) or n <= 0:
            return []
        it = data_lib.make_batches(self.cfg.data, self.val_docs, process_index=jax.process_index(),
                                   process_count=jax.process_count(), shuffle=False, repeat=True)
        return [self.global_batch(next(it)) for _ in range(n)]

    def evaluate(self, params, batches) -> float | None:
        if not batches:
            return None
        tot, cnt = 0.0, 0.0
        with mesh_context(self.mesh):
            for b in batches:
                s, n = self._eval_step(params, b["tokens"], b["segment_ids"])
                tot += float(s)
                cnt += float(n)
        return tot / max(cnt, 1.0)

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Trains to ``train.steps`` (resuming from the workdir's newest complete checkpoint). Returns a summary
        dict (losses by step, final eval loss, wall time, ...). Raises TrainingError on a non-finite loss."""
        cfg = self.cfg
        t_start = time.time()
        self.workdir.mkdir(parents=True, exist_ok=True)
        it = self.make_data()
        ckptr = ckpt_lib.Checkpointer(self.workdir / "checkpoints", keep=cfg.checkpoint.keep,
                                      async_save=cfg.checkpoint.async_save) if cfg.checkpoint.enabled else None
        rng = jax.random.key(cfg.train.seed)
        start_step, tokens_seen = 0, 0
        restored = None
        if ckptr is not None:
            with mesh_context(self.mesh):
                restored = ckptr.restore_latest(self.abs_params, self.abs_opt,
                                                data_keys=[f"shard_{s}" for s in it.shards])
        if restored is not None:
            start_step, params, opt_state, meta, data_state = restored
            it.set_state(data_state)
            rng = jax.random.wrap_key_data(jnp.asarray(np.asarray(meta["rng"], dtype=np.uint32)))
            tokens_seen = int(meta.get("tokens_seen", 0))
            self.log(f"resumed from {ckptr.directory} at step {start_step}")
        else:
            params, opt_state = self.init_state()
            if cfg.train.init_from:
                params = self.load_initial_params(cfg.train.init_from, params)
        if self.is_main:
            self.log(f"model: {self.mcfg.model_type} {self.n_params / 1e6:.2f}M parameters "
                     f"(D={self.mcfg.hidden_size}, layers={self.mcfg.num_hidden_layers}, heads={self.mcfg.num_heads}); "
                     f"mesh {dict(self.mesh.shape)}; batch {cfg.data.batch_size}x{cfg.data.seq_len} tokens; "
                     f"{len(self.train_docs)} train / {len(self.val_docs)} held-out documents")
        writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_main)
        eval_set = None
        losses: dict[int, float] = {}
        last_saved = start_step if restored is not None else None
        stop = _StopFlag()
        B, T = cfg.data.batch_size, cfg.data.seq_len
        n_dev = self.mesh.devices.size
        progress = metrics_lib.Progress(self.total_steps, start_step, enabled=cfg.train.progress and self.is_main
                                        and start_step < self.total_steps, log=self.log)
        final_eval = None

        def save(step):
            nonlocal last_saved
            if ckptr is None or last_saved == step:
                return
            meta = {"step": step, "rng": np.asarray(jax.random.key_data(rng)).tolist(), "tokens_seen": tokens_seen,
                    "data_shards": it.num_shards, "config": config_lib.to_dict(cfg)}
            ckptr.save(step, params, opt_state, meta, data_state_before)
            last_saved = step

        step = start_step
        data_state_before = it.get_state()
        try:
            with stop.installed():
                batch = self.global_batch(next(it)) if step < self.total_steps else None
                busy, tok_log = 0.0, 0  # seconds in train steps (incl. loading the next batch) since the last log
                loss_acc, loss_n = 0.0, 0  # for the mean loss over the logging interval
                while step < self.total_steps:
                    t0 = time.time()
                    params, opt_state, m = self.train_step(params, opt_state, batch)
                    step += 1
                    tokens_seen += B * T
                    # host work for the next step overlaps the device work of this one
                    data_state_before = it.get_state()
                    next_batch = self.global_batch(next(it)) if step < self.total_steps else None
                    loss = float(m["loss"])
                    gnorm = float(m["grad_norm"])
                    losses[step] = loss
                    if not (math.isfinite(loss) and math.isfinite(gnorm)):
                        kept = f"the last good checkpoint is step {last_saved} in {ckptr.directory}" \
                            if ckptr is not None and last_saved is not None else "no checkpoint was saved"
                        raise TrainingError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                            f"({loss if not math.isfinite(loss) else gnorm}) at step {step}; "
                                            f"stopping without saving this state; {kept}")
                    batch = next_batch
                    tok_log += B * T
                    dt_step = time.time() - t0
                    busy += dt_step
                    loss_acc, loss_n = loss_acc + loss, loss_n + 1
                    progress.update(1, loss=f"{loss:.3f}", tok_s=f"{B * T / max(dt_step, 1e-9):.0f}")
                    do_eval = cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == self.total_steps)
                    record = None
                    if step % cfg.train.log_every == 0 or step == start_step + 1 or step == self.total_steps or do_eval:
                        tps = tok_log / max(busy, 1e-9)
                        mfu = (tps * self.flops_per_token / (self.peak * n_dev)) if self.peak else None
                        record = {"loss": loss, "loss_avg": loss_acc / max(loss_n, 1),
                                  "lr": float(self.schedule(step - 1)), "grad_norm": gnorm,
                                  "tokens_per_sec": tps, "mfu": mfu, "tokens": tokens_seen,
                                  "elapsed": time.time() - t_start}
                        busy, tok_log, loss_acc, loss_n = 0.0, 0, 0.0, 0
                    if do_eval:
                        if eval_set is None:
                            eval_set = self.eval_batches(cfg.train.eval_batches)
                        ev = self.evaluate(params, eval_set)
                        if ev is not None:
                            record["eval_loss"] = ev
                            record["eval_ppl"] = math.exp(min(ev, 50.0))
                            final_eval = ev
                    if record is not None:
                        writer.write(step, record)
                        if self.is_main:
                            line = (f"step {step:>6}/{self.total_steps}  loss {loss:.4f} "
                                    f"(mean {record['loss_avg']:.4f})  lr {record['lr']:.2e}  "
                                    f"grad_norm {gnorm:.3f}  tokens/s {record['tokens_per_sec']:.0f}")
                            if record.get("mfu") is not None:
                                line += f"  mfu {100 * record['mfu']:.1f}%"
                            if "eval_loss" in record:
                                line += f"  eval_loss {record['eval_loss']:.4f}"
                            progress.write(line)
                    if ckptr is not None and (step % cfg.checkpoint.every == 0 or step == self.total_steps):
                        save(step)
                    if _TEST_SIGNAL is not None and step == _TEST_SIGNAL[1]:
                        os.kill(os.getpid(), _TEST_SIGNAL[0])  # test hook: preemption / hard kill at this step
                    if stop.requested:
                        self.log(f"received {stop.signame}: saving a checkpoint at step {step} and stopping")
                        if ckptr is not None:
                            save(step)
                        break
        finally:
            progress.close()
            writer.close()
            if ckptr is not None:
                ckptr.close()
        self.params = params
        return {"start_step": start_step, "step": step, "losses": losses, "eval_loss": final_eval,
                "wall_time": time.time() - t_start, "stopped_by_signal": stop.signame, "params": params,
                "n_params": self.n_params}


def _values(state):
    """nnx.State of Variables -> the same State holding raw values (arrays / ShapeDtypeStructs)."""
    def one(v):
        return v.get_value()
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class _StopFlag:
    """SIGTERM/SIGINT set a flag the loop checks after each step (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.signame = None

    @property
    def requested(self) -> bool:
        return self.signame is not None

    def _handler(self, signum, frame):
        if self.signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def save_resolved_config(cfg, workdir, mcfg=None) -> None:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(cfg, workdir / "config.yaml")
    if mcfg is not None:
        (workdir / "model_config.json").write_text(json.dumps(mcfg.to_dict(), indent=2, default=str))


def sample(trainer: Trainer, params, prompt: str, num_tokens: int, *, temperature: float = 0.7, seed: int = 0):
    """Samples ``num_tokens`` tokens after ``prompt`` with the full forward over a fixed-length buffer (one
    compilation; causal, so the unused tail does not matter). Stops at EOS. Returns the generated text."""
    tok = trainer.tokenizer
    ids = [int(i) for i in tok.encode(prompt)] or [tok.eos_id]
    if jax.process_count() == 1:
        try:  # O(1)-state decoding with gla_jax.generate, on one device
            from gla_jax.generate import generate

            local = jax.device_put(jax.device_get(params), jax.devices()[0])
            model = nnx.merge(trainer.graphdef, local) if trainer.rest_state is None else \
                nnx.merge(trainer.graphdef, local, trainer.rest_state)
            out = generate(model, [ids], max_new_tokens=num_tokens, temperature=temperature, stop_tokens=(tok.eos_id,),
                           seed=seed + 1234)
            return tok.decode([t for t in out.sequences()[0] if t != tok.eos_id])
        except ImportError:
            pass
    L = -(-(len(ids) + num_tokens) // 64) * 64
    vocab = tok.vocab_size
    repl = shard_lib.replicated(trainer.mesh)

    def next_logits(params, buf, pos):
        logits = trainer._apply(params, buf, jnp.ones_like(buf))
        row = jax.lax.dynamic_index_in_dim(logits[0], pos, axis=0, keepdims=False)
        return jnp.where(jnp.arange(row.shape[-1]) < vocab, row.astype(jnp.float32), -jnp.inf)

    fn = jax.jit(next_logits, in_shardings=(trainer.param_shardings, repl, repl), out_shardings=repl)
    buf = np.zeros((1, L), np.int32)
    buf[0, :len(ids)] = ids
    key = jax.random.key(seed + 1234)
    out = []
    pos = len(ids) - 1
    with mesh_context(trainer.mesh):
        for i in range(num_tokens):
            row = fn(params, jnp.asarray(buf), jnp.int32(pos))
            if temperature > 0:
                nxt = int(jax.random.categorical(jax.random.fold_in(key, i), row / temperature))
            else:
                nxt = int(jnp.argmax(row))
            if nxt == tok.eos_id or pos + 1 >= L:
                break
            pos += 1
            buf[0, pos] = nxt
            out.append(nxt)
    return tok.decode(out)
