"""Progress output when stderr is not a terminal: stage lines, plain progress lines, the resume
line after an interrupted run, and ``--quiet`` (the kill -9 + rerun of a real script is checked in
``test_faults.py``, on the runs it already makes)."""

from __future__ import annotations

import io
import re

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax import cli, progress
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.loop import fit, resume
from rlhf_jax.runs import RunDir
from rlhf_jax.stages.lm import PretrainConfig
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer, make_train_step

LINE = re.compile(r"toy: step (\d+)/12 \(\d+%\), [\d.e+-]+ steps/s, ETA [^,]+(, loss=[\d.e+-]+)?$")


class Interrupted(Exception):
    pass


def _loss(params, batch, key):
    loss = jnp.sum(jnp.square(params["w"] - batch["target"]))
    return loss, {"loss": loss}


STEP = jax.jit(make_train_step(_loss), donate_argnums=0)


def _toy_run(out, *, fail_after: int | None = None):
    """A 12-step toy training run in ``out`` (checkpoints every 4 steps) through ``loop.fit`` and
    ``loop.resume``, inside ``progress.stage``; raises ``Interrupted`` after step ``fail_after``."""
    optim = OptimConfig(learning_rate=0.1, warmup_steps=0)
    state = TrainState.create({"w": jnp.zeros((3,))}, make_optimizer(optim, 12))
    run, key = RunDir(out), jax.random.key(0)
    ckpt = Checkpointer(out / "checkpoints", async_save=False)

    def on_step(done, _):
        if done == fail_after:
            raise Interrupted
    try:
        with progress.stage("toy", out):
            state = resume(state, ckpt, run, key, stage="toy")
            return fit(state, STEP, lambda s: {"target": jnp.full((3,), 1.0 + s)}, steps=12,
                       key=key, run=run, prefix="toy", log_every=3, checkpoint_every=4,
                       ckpt=ckpt, on_step=on_step)
    finally:
        ckpt.close()


def test_plain_lines_start_progress_end_and_resume(tmp_path, capsys):
    """Under a non-terminal stderr: ``start → out``, a progress line per step group with
    step/total, steps/s, ETA and the loss, ``done in``; interrupted after step 6 and rerun, the
    rerun says it resumes ``out`` from the step-4 checkpoint with data position and key, and
    counts on from there."""
    out = tmp_path / "toy"
    with pytest.raises(Interrupted):
        _toy_run(out, fail_after=6)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"toy: start → {out}"
    assert re.fullmatch(r"toy: failed after [\d.]+ s", err[-1])
    _toy_run(out)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"toy: start → {out}"
    assert err[1] == (f"toy: resuming {out} from the checkpoint at step 4; data position (next "
                      "step 4) and PRNG key restored")
    steps = [int(LINE.match(e).group(1)) for e in err[2:-1]]
    assert steps[0] > 4 and steps[-1] == 12 and steps == sorted(steps), err
    assert LINE.match(err[-2]).group(2), "the loss of the last logged step is shown"
    assert re.fullmatch(r"toy: done in [\d.]+ s", err[-1])


def test_progress_lines_every_n_steps_or_interval():
    """Lines every ``every`` steps and at the end; the interval forces one when steps are slow."""
    stream = io.StringIO()
    bar = progress.Progress("toy", 12, every=5, stream=stream)
    for s in range(1, 13):
        bar.update(s, loss=0.5)
    got = [int(LINE.match(x).group(1)) for x in stream.getvalue().splitlines()]
    assert got == [5, 10, 12]
    stream = io.StringIO()
    bar = progress.Progress("toy", 12, every=100, interval=0.0, stream=stream)
    bar.update(1, loss=1.0)
    bar.update(2)
    assert len(stream.getvalue().splitlines()) == 2


def test_reused_line_and_quiet(tmp_path, capsys):
    """``reused`` names the run directory; ``--quiet`` (parsed by every script's CLI) silences
    stage, progress and resume lines."""
    progress.reused("reward", tmp_path)
    assert capsys.readouterr().err == f"reward: finished run in {tmp_path} reused\n"
    try:
        cli.parse(PretrainConfig, ["--out", str(tmp_path / "q"), "--quiet"])
        _toy_run(tmp_path / "q")
        assert capsys.readouterr().err == ""
    finally:
        progress.set_quiet(False)
    cli.parse(PretrainConfig, ["--out", str(tmp_path / "q")])
    with progress.stage("x", tmp_path):
        pass
    assert capsys.readouterr().err.startswith("x: start")
