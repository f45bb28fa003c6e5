"""Faults: kill -9 during training and during a checkpoint save, non-finite steps, a run
directory resumed under another config, and an async save racing a donating step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax.checkpoint import FAULT_KILL_AT_SAVE, Checkpointer
from rlhf_jax.loop import NonFiniteError, fit, key_data, resume, truncate_metrics
from rlhf_jax.runs import RunDir
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer, make_train_step

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ["--steps", "30", "--batch-size", "8", "--seq-len", "32", "--model.d-model", "32",
            "--model.n-layers", "1", "--model.n-heads", "2", "--task.world.n-real", "12",
            "--task.world.n-fictional", "12", "--task.world.docs-per-person", "2",
            "--log-every", "5", "--checkpoint-every", "5", "--optim.warmup-steps", "5"]


def _cmd(out):
    return [sys.executable, str(ROOT / "experiments" / "pretrain.py"), "--out", str(out), *PRETRAIN]


def _env(**extra):
    return dict(os.environ, RLHF_JAX_NO_REEXEC="1", **extra)


def _params(out):
    with ocp.StandardCheckpointer() as c:
        return jax.tree.leaves(c.restore((out / "params").resolve()))


def _assert_same_run(a: Path, b: Path):
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    for x, y in zip(_params(a), _params(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(out), env=_env(), check=True, capture_output=True, timeout=600)
    return out


def test_kill_9_mid_training_then_rerun_is_bit_identical(reference_run, tmp_path):
    """SIGKILL a real training process once its step-10 checkpoint is complete; rerunning the
    same command resumes (no step repeated or skipped) and ends bit-identical."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "10").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "summary.json").exists()
    subprocess.run(_cmd(out), env=_env(), check=True, capture_output=True, timeout=600)
    _assert_same_run(out, reference_run)


def test_kill_9_during_a_checkpoint_save_keeps_the_previous_one(reference_run, tmp_path):
    """The process kills itself (SIGKILL) right after starting the asynchronous save of step 15:
    that checkpoint never completes, step 10 stays restorable, and the rerun is bit-identical."""
    from rlhf_jax import log_writers

    out = tmp_path / "run"
    mirror = {log_writers.ENV: "tensorboard"}
    dead = subprocess.run(_cmd(out), env=_env(**{FAULT_KILL_AT_SAVE: "15"}, **mirror),
                          capture_output=True, timeout=600)
    assert dead.returncode == -signal.SIGKILL
    assert list((out / "checkpoints").glob("15.orbax-checkpoint-tmp*"))
    ckpt = Checkpointer(out / "checkpoints")
    assert ckpt.latest_step() == 10      # the interrupted step-15 save is not a checkpoint ...
    assert not list((out / "checkpoints").glob("*tmp*"))   # ... and its remains are removed
    ckpt.close()
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 15        # metrics of steps after the checkpoint were logged ...
    again = subprocess.run(_cmd(out), env=_env(**mirror), check=True, capture_output=True,
                           text=True, timeout=600)
    _assert_same_run(out, reference_run)  # ... and are replaced, not duplicated
    # so in the TensorBoard mirror (the killed process's step 15 purged, the rows up to the
    # checkpoint it had not flushed yet replayed)
    tb = log_writers.read_tensorboard(out / "tensorboard")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert tb and all([s for s, _ in tb[k]] == [r["step"] for r in rows if k in r] for k in tb)
    # stderr is a pipe, not a terminal: plain resume and progress lines (rlhf_jax.progress)
    assert (f"pretrain: resuming {out} from the checkpoint at step 10; data position (next step "
            "10) and PRNG key restored") in again.stderr, again.stderr
    assert re.search(r"^pretrain: step 30/30 \(100%\), [\d.e+-]+ steps/s, ETA .*, loss=",
                     again.stderr, re.M), again.stderr


def test_rerun_with_another_config_is_refused_naming_the_field(reference_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    before = (out / "metrics.jsonl").read_text()
    cmd = _cmd(out) + ["--optim.learning-rate", "0.01"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "optim.learning_rate" in res.stderr
    assert (out / "metrics.jsonl").read_text() == before, "no data lost"


def test_truncate_metrics_drops_later_rows_and_a_half_written_line(tmp_path):
    run = RunDir(tmp_path)
    for s in (5, 10, 15):
        run.log_metrics(s, {"loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "lo')
    truncate_metrics(run, 10)
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == [5, 10]


def test_truncate_metrics_refuses_a_damaged_row_inside_the_file_and_changes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5}\n{"step": 10, "lo\n{"step": 15}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON row"):
        truncate_metrics(RunDir(tmp_path), 15)
    assert path.read_text() == '{"step": 5}\n{"step": 10, "lo\n{"step": 15}\n'


def test_a_rerun_of_a_run_killed_before_its_first_checkpoint_starts_its_metrics_afresh(tmp_path):
    """Rows a killed run logged before any checkpoint (the last one cut short) are logged again
    by the rerun, which starts from step 0: the file holds each step once, as an uninterrupted
    run's does."""
    run = RunDir(tmp_path)
    for s in (2, 4):
        run.log_metrics(s, {"loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    state = _toy_state(OptimConfig(warmup_steps=0))
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert resume(state, ckpt, run, jax.random.key(0)) is state
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    ckpt.close()


# --------------------------------------------------------------------------- non-finite steps
def _toy_state(optim: OptimConfig):
    params = {"w": jnp.ones((4,), jnp.float32)}
    return TrainState.create(params, make_optimizer(optim, 10))


def _toy_loss(params, batch, key):
    # batch["scale"] is inf on a poisoned step, making loss and gradient non-finite
    loss = jnp.sum(jnp.square(params["w"] - 2.0)) * batch["scale"]
    return loss, {"loss": loss}


def _toy_fit(tmp_path, mode, bad_step=3):
    optim = OptimConfig(learning_rate=0.1, warmup_steps=0, on_nonfinite=mode)
    run = RunDir(tmp_path / mode)
    ckpt = Checkpointer(tmp_path / mode / "checkpoints", async_save=False)
    step = jax.jit(make_train_step(_toy_loss), donate_argnums=0)
    batch_at = lambda s: {"scale": jnp.float32(np.inf if s == bad_step else 1.0)}  # noqa: E731
    try:
        return fit(_toy_state(optim), step, batch_at, steps=8, key=jax.random.key(0), run=run,
                   prefix="toy", log_every=1, checkpoint_every=1, ckpt=ckpt,
                   on_nonfinite=mode), ckpt, run
    finally:
        ckpt.wait()


def test_nonfinite_step_stops_naming_step_and_metrics_without_a_bad_checkpoint(tmp_path):
    """The 4th step (batch 3) is non-finite: the error and ``nonfinite.json`` name step 4, as
    ``metrics.jsonl`` counts steps, and the last checkpoint is the one after step 3."""
    with pytest.raises(NonFiniteError, match=r"toy: step 4 .*after step 3 .*loss=inf"):
        _toy_fit(tmp_path, "stop")
    ckpt = Checkpointer(tmp_path / "stop" / "checkpoints")
    assert ckpt.latest_step() == 3       # steps 1..3 done; nothing saved after the bad step
    state, _ = ckpt.restore(_toy_state(OptimConfig(warmup_steps=0)))
    assert np.isfinite(np.asarray(state.params["w"])).all()
    assert json.loads((tmp_path / "stop" / "nonfinite.json").read_text())["step"] == 4
    ckpt.close()


def test_nonfinite_stop_lets_the_checkpoint_still_being_saved_land(tmp_path):
    """An asynchronous save of the last checked state is finished before the error leaves
    ``fit``: a rerun resumes from it."""
    optim = OptimConfig(learning_rate=0.1, warmup_steps=0)
    ckpt = Checkpointer(tmp_path / "checkpoints")   # asynchronous
    step = jax.jit(make_train_step(_toy_loss), donate_argnums=0)
    batch_at = lambda s: {"scale": jnp.float32(np.inf if s == 3 else 1.0)}  # noqa: E731
    with pytest.raises(NonFiniteError):
        fit(_toy_state(optim), step, batch_at, steps=8, key=jax.random.key(0),
            run=RunDir(tmp_path), prefix="toy", log_every=1, checkpoint_every=3, ckpt=ckpt)
    assert (tmp_path / "checkpoints" / "3").is_dir()
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    ckpt.close()


def test_nonfinite_step_is_skipped_and_counted_when_configured(tmp_path):
    state, ckpt, run = _toy_fit(tmp_path, "skip")
    ckpt.close()
    assert int(state.step) == 8                  # the data position moved past the bad step
    assert np.isfinite(np.asarray(state.params["w"])).all()
    rows = [json.loads(r) for r in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert rows[3]["toy/finite"] == 0.0 and rows[-1]["toy/nonfinite_steps"] == 1.0
    # the skipped step changed nothing: same as an 7-step run without it
    clean = _toy_state(OptimConfig(learning_rate=0.1, warmup_steps=0))
    step = jax.jit(make_train_step(_toy_loss))
    for _ in range(7):
        clean, _ = step(clean, {"scale": jnp.float32(1.0)}, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(clean.params["w"]))


def test_resume_refuses_a_checkpoint_written_under_another_key(tmp_path):
    optim = OptimConfig(learning_rate=0.1, warmup_steps=0)
    run = RunDir(tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    step = jax.jit(make_train_step(_toy_loss), donate_argnums=0)
    fit(_toy_state(optim), step, lambda s: {"scale": jnp.float32(1.0)}, steps=2,
        key=jax.random.key(0), run=run, prefix="toy", log_every=1, ckpt=ckpt)
    assert int(resume(_toy_state(optim), ckpt, run, jax.random.key(0)).step) == 2
    with pytest.raises(ValueError, match="another PRNG key"):
        resume(_toy_state(optim), ckpt, run, jax.random.key(1))
    ckpt.close()


# --------------------------------------------------------------------------- early stop
def test_early_stop_saves_a_final_checkpoint_that_a_rerun_does_not_train_past(tmp_path):
    """``stop`` ends the loop after the step it fires on; the checkpoint of that step says so,
    and running the same loop again on the run directory trains no further step."""
    optim = OptimConfig(learning_rate=0.2, warmup_steps=0)
    calls = []

    def go():
        run = RunDir(tmp_path)
        ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
        step = jax.jit(make_train_step(_toy_loss), donate_argnums=0)

        def counted(st, b, k):
            calls.append(1)
            return step(st, b, k)
        state = fit(resume(_toy_state(optim), ckpt, run, jax.random.key(0)), counted,
                    lambda s: {"scale": jnp.float32(1.0)}, steps=8, key=jax.random.key(0),
                    run=run, prefix="toy", log_every=1, ckpt=ckpt,
                    stop=lambda done, row: row["toy/loss"] < 1.0)
        ckpt.close()
        return state, ckpt, run

    state, ckpt, run = go()
    rows = [json.loads(r) for r in (run.path / "metrics.jsonl").read_text().splitlines()]
    # loss (w - 2)^2 * 4 from w = 1: it falls below 1 at some step before the 8th
    first = next(r["step"] for r in rows if r["toy/loss"] < 1.0)
    assert first < 8 and rows[-1]["step"] == first == int(state.step) == len(calls)
    assert ckpt.latest_step() == first and Checkpointer(tmp_path / "checkpoints").extra() == {
        "next_step": first, "key": key_data(jax.random.key(0)), "stopped": True}
    calls.clear()
    state2, _, _ = go()
    assert calls == [] and int(state2.step) == first
    np.testing.assert_array_equal(np.asarray(state2.params["w"]), np.asarray(state.params["w"]))


# --------------------------------------------------------------------------- async save vs donation
def test_async_save_then_donating_step_writes_the_state_as_it_was(tmp_path):
    """Start an asynchronous save and at once run a step that donates (and overwrites) the very
    buffers being saved: the checkpoint holds the state at the save."""
    big = {"w": jnp.arange(2_000_000, dtype=jnp.float32)}     # 8 MB: a save takes a while
    state = TrainState.create(big, make_optimizer(OptimConfig(warmup_steps=0), 10))
    expected = jax.tree.map(np.array, state)                   # host copies
    bump = jax.jit(lambda st: st.replace(step=st.step + 1,
                                         params=jax.tree.map(lambda x: x * 3.0 + 1.0, st.params)),
                   donate_argnums=0)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=True)
    ckpt.save(0, state)
    for _ in range(3):
        state = bump(state)                                    # donates the saved buffers
    jax.block_until_ready(state)
    ckpt.wait()
    restored, _ = ckpt.restore(state, 0)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert not np.array_equal(np.asarray(state.params["w"]), expected.params["w"])
    ckpt.close()


def test_warmup_that_fills_the_stage_is_a_valid_schedule():
    """warmup_steps == total steps (e.g. a short RLOO run) trains, with the learning rate rising
    linearly to its peak, instead of failing inside optax (decay_steps=0)."""
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=4, clip_norm=0.0, weight_decay=0.0)
    tx = make_optimizer(cfg, 4)
    params = {"w": jnp.zeros((1,))}
    state = tx.init(params)
    steps = []
    for _ in range(4):   # Adam's first updates on a constant gradient are -lr exactly
        updates, state = tx.update({"w": jnp.ones((1,))}, state, params)
        steps.append(-float(updates["w"][0]))
    np.testing.assert_allclose(steps, [0.0, 2.5e-3, 5e-3, 7.5e-3], rtol=1e-4, atol=1e-9)
