"""Run directories (JSON files notebooks read) and Orbax checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax
from rlhf_jax import runs
from rlhf_jax.checkpoint import Checkpointer, load_params, save_params
from rlhf_jax.models import create_model, preset
from rlhf_jax.runs import RunDir, read_metrics
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer


def _strict_json(text: str):
    """json.loads that rejects NaN / Infinity literals (not JSON; many readers choke on them)."""
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


# --------------------------------------------------------------------------- RunDir
def test_a_rerun_keeps_the_start_record_and_refuses_changed_input_files(tmp_path, monkeypatch):
    """meta.json keeps how the run started and lists each rerun; a rerun whose checkpoint or data
    files differ from the recorded digests is refused naming them, and nothing is rewritten."""
    monkeypatch.setattr(runs, "_git_commit", lambda: "start")
    run = RunDir(tmp_path)
    files = {"config.json": "c1", "model.safetensors": "w1"}
    run.write_meta(seed=1, extra={"init_from": {"path": "/a", "files": files},
                                  "data": {"files": {"train.jsonl": "d1"}}})
    run.log_metrics(1, {"loss": 1.0})                    # the run has started
    monkeypatch.setattr(runs, "_git_commit", lambda: "later")
    run.write_meta(seed=1, extra={"init_from": {"path": "/moved", "files": dict(files)},
                                  "data": {"files": {"train.jsonl": "d1"}}})
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["git_commit"] == "start" and meta["init_from"]["path"] == "/a"
    assert [r["git_commit"] for r in meta["resumed"]] == ["later"]
    before = (tmp_path / "meta.json").read_text()
    for extra, named in (
            ({"init_from": {"files": {**files, "model.safetensors": "w2"}}}, "model.safetensors"),
            ({"init_from": {"files": files}, "data": {"files": {"train.jsonl": "d2"}}},
             "train.jsonl")):
        with pytest.raises(runs.ConfigError, match=rf"files changed since .*\({named};"):
            run.write_meta(seed=1, extra=extra)
        assert (tmp_path / "meta.json").read_text() == before


def test_a_run_that_stopped_before_any_work_starts_afresh(tmp_path, monkeypatch):
    """A run refused at run time (a malformed data row, a bad checkpoint) leaves only its
    config.json and meta.json (and empty directories): rerunning it there with the config or
    input file corrected starts afresh. Once it has written anything else (a metric, a stage's
    checkpoint), both changes are refused as before."""
    monkeypatch.setattr(runs, "_git_commit", lambda: "start")
    run = RunDir(tmp_path)
    run.write_config({"steps": 3, "data": "a"})
    run.write_meta(seed=1, extra={"data": {"files": {"train.jsonl": "d1"}}})
    (tmp_path / "data" / "hh_rlhf").mkdir(parents=True)    # what a failed data preparation leaves
    (tmp_path / "stage").mkdir()
    RunDir(tmp_path / "stage").write_config({"steps": 3})
    assert not run.started()
    monkeypatch.setattr(runs, "_git_commit", lambda: "fixed")
    assert run.write_config({"steps": 3, "data": "b"}) == []
    run.write_meta(seed=1, extra={"data": {"files": {"train.jsonl": "d2"}}})
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["git_commit"], meta["data"]["files"], "resumed" in meta) == (
        "fixed", {"train.jsonl": "d2"}, False)
    assert json.loads((tmp_path / "config.json").read_text())["data"] == "b"
    for work in (tmp_path / "metrics.jsonl", tmp_path / "stage" / "checkpoints" / "3" / "x"):
        work.parent.mkdir(parents=True, exist_ok=True)
        work.write_text("{}")
        assert run.started()
        with pytest.raises(runs.ConfigError, match="differing fields: data"):
            run.write_config({"steps": 3, "data": "c"})
        with pytest.raises(runs.ConfigError, match=r"files changed since .*\(train.jsonl;"):
            run.write_meta(seed=1, extra={"data": {"files": {"train.jsonl": "d3"}}})
        work.unlink()



def test_a_linked_directory_of_work_makes_the_run_started(tmp_path):
    """A run whose checkpoints directory is a link to scratch space (holding a checkpoint, no
    metric yet) has started: a different config is refused, not written over it."""
    scratch = tmp_path / "scratch"
    (scratch / "100" / "state").mkdir(parents=True)
    (scratch / "100" / "state" / "manifest.ocdbt").write_text("x")
    run = RunDir(tmp_path / "run")
    run.write_config({"steps": 3, "lr": 1.0})
    (run.path / "checkpoints").symlink_to(scratch, target_is_directory=True)
    assert run.started()
    with pytest.raises(runs.ConfigError, match="differing fields: lr"):
        run.write_config({"steps": 3, "lr": 2.0})

def test_a_finished_upstream_run_inside_is_not_the_stage_s_work(tmp_path):
    """``sft.py --out X`` runs its default pretraining into ``X/pretrain`` first: that finished
    run (checked against the command by ``upstream_run``) does not make X started, so SFT
    refused at run time reruns there with a corrected config; any other subdirectory does."""
    (tmp_path / "pretrain" / "checkpoints" / "5").mkdir(parents=True)
    (tmp_path / "pretrain" / "checkpoints" / "5" / "state").write_text("{}")
    (tmp_path / "pretrain" / "summary.json").write_text("{}")
    run = RunDir(tmp_path, upstream=(tmp_path / "pretrain",))
    run.write_config({"steps": 25})
    assert not run.started()
    assert run.write_config({"steps": 0}) == []
    assert RunDir(tmp_path).started()
    (tmp_path / "metrics.jsonl").write_text("{}")
    assert run.started()


def test_a_damaged_config_json_is_an_error_naming_it(tmp_path):
    run = RunDir(tmp_path)
    run.log_metrics(1, {"loss": 1.0})                    # a started run: resumed, not replaced
    (tmp_path / "config.json").write_text('{"steps": 3')
    with pytest.raises(runs.ConfigError, match=r"config.json: not a JSON config"):
        run.write_config({"steps": 3})


def test_a_data_set_build_killed_midway_is_no_work(tmp_path):
    """A run killed while TFDS wrote its data set (before any training) leaves the build's
    ``incomplete.*`` directory with shards in it: that is no work, so the rerun with corrected
    preference files starts afresh instead of being refused as 'data files changed'."""
    with runs.run_locks():   # the directory is free again after the block
        run = RunDir(tmp_path)
        run.write_config({"steps": 3})
        run.write_meta(seed=0, extra={"data": {"path": "d", "files": {"train.jsonl": "a"}}})
        partial = tmp_path / "data" / "hh_rlhf" / "incomplete.AB12CD_1.1.0"
        partial.mkdir(parents=True)
        (partial / "hh_rlhf-train.array_record-00000-of-00001").write_bytes(b"half")
        assert not run.started()
        run.write_meta(seed=0, extra={"data": {"path": "d", "files": {"train.jsonl": "b"}}})
        (tmp_path / "data" / "hh_rlhf" / "1.1.0").mkdir()
        (tmp_path / "data" / "hh_rlhf" / "1.1.0" / "dataset_info.json").write_text("{}")
        assert run.started()                                 # a finished build is the run's work


def test_a_damaged_meta_json_is_an_error_naming_it(tmp_path):
    """A rerun reads meta.json (the digests of its inputs): a hand-edited or damaged one is an
    error naming it, not a JSONDecodeError traceback."""
    run = RunDir(tmp_path)
    run.log_metrics(1, {"loss": 1.0})                    # a started run: its meta.json is read
    (tmp_path / "meta.json").write_text('{"seed": 3, "argv": ["x')
    with pytest.raises(runs.ConfigError, match=r"meta.json: not a JSON config"):
        run.write_meta(seed=3)


def test_an_out_that_is_a_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("keep me")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(runs.ConfigError, match=r"file.*(not a directory|cannot be a run)"):
            RunDir(out)
    assert (tmp_path / "file").read_text() == "keep me"


_HOLD_RUN_DIR = """
import sys
from rlhf_jax.runs import RunDir
RunDir(sys.argv[1]).write_config({"steps": 3})
print("claimed", flush=True)
sys.stdin.read()          # hold the run directory until the test closes stdin
"""


def test_a_second_process_on_a_run_directory_is_refused(tmp_path):
    """Two processes on one run directory would each remove the other's checkpoint save in
    progress (as a killed save's) and append to one metrics.jsonl: the second is refused naming
    the directory and the first one's pid, before it writes anything; after the first ends
    (however it ends: the kernel drops its lock), a rerun goes on. One process may claim its own
    directory again (a resumed stage, a pipeline's stages)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(rlhf_jax.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_RUN_DIR, str(out)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        before = (out / "config.json").read_text()
        with pytest.raises(runs.ConfigError,
                           match=rf"{out}: another process \(pid {holder.pid}\) is running"):
            RunDir(out).write_config({"steps": 4})
        assert (out / "config.json").read_text() == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with runs.run_locks():                               # as cli.main and scripts.run do
        run = RunDir(out)
        run.write_config({"steps": 3})
        run.write_config({"steps": 3})                  # this process's own claim, again
        assert not run.started()                         # the lock file is no work
        assert out.resolve() in runs._LOCKS
    assert out.resolve() not in runs._LOCKS              # free for another process again


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch,
                                                                   capsys):
    """Where flock is not supported (some network or FUSE mounts: ENOLCK), the run goes on
    unclaimed and says so, rather than failing."""
    import errno
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with runs.run_locks():
        RunDir(tmp_path / "run").write_config({"steps": 3})
        assert (tmp_path / "run").resolve() not in runs._LOCKS
    assert "cannot lock the run directory" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.json").exists()


def test_run_dir_writes_config_meta_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "_git_commit", lambda: "abc123")
    monkeypatch.setattr(runs, "_git_dirty", lambda: True)
    run = RunDir(tmp_path / "run" / "nested")       # parents are created
    cfg = {"model": {"d_model": 32, "n_layers": 2}, "lr": 3e-4, "name": "x", "tags": [1, 2]}
    run.write_config(cfg)
    run.write_meta(seed=7, extra={"stage": "sft"})
    run.write_summary({"gold": np.float32(0.25), "steps": 10, "arr": jnp.arange(3)})
    assert _strict_json((run.path / "config.json").read_text()) == cfg
    meta = _strict_json((run.path / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["stage"] == "sft" and meta["git_commit"] == "abc123"
    assert meta["git_dirty"] is True
    assert meta["jax_version"] == jax.__version__
    assert meta["rlhf_jax_version"] == rlhf_jax.__version__
    assert meta["devices"] and meta["process_count"] == 1
    assert run.read_summary() == {"gold": 0.25, "steps": 10, "arr": [0, 1, 2]}
    run.write_summary({"gold": 1.0})                 # overwritten, not appended
    assert run.read_summary() == {"gold": 1.0}
    assert not list(run.path.glob(".*.tmp"))        # atomic writes leave no temp files


def test_a_field_added_after_a_run_resumes_it_at_its_default(tmp_path):
    """A stored config without a field the config class gained since is the same config when
    the new field is at its default (so the run resumes), and a different one otherwise; other
    differences are still named."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Inner:
        a: int = 1
        added: float = 0.1

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner = Inner()
        steps: int = 5
        tags: tuple = dataclasses.field(default_factory=tuple)

    run = RunDir(tmp_path)
    run.log_metrics(1, {"loss": 1.0})                    # a started run: resumed, not replaced
    (tmp_path / "config.json").write_text(json.dumps({"inner": {"a": 1}, "steps": 5}))
    run.write_config(Outer())                                    # added, tags: at defaults
    assert json.loads((tmp_path / "config.json").read_text())["inner"]["added"] == 0.1
    (tmp_path / "config.json").write_text(json.dumps({"inner": {"a": 1}, "steps": 5}))
    with pytest.raises(runs.ConfigError, match=r"differing fields: inner\.added —"):
        run.write_config(Outer(inner=Inner(added=0.2)))
    with pytest.raises(runs.ConfigError, match=r"differing fields: inner\.added, steps"):
        run.write_config(Outer(inner=Inner(added=0.2), steps=6))
    # a plain dict has no defaults: an added key is a difference
    (tmp_path / "config.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(runs.ConfigError, match="differing fields: y"):
        run.write_config({"x": 1, "y": 2})


def test_a_path_respelled_from_the_same_directory_is_the_same_config(tmp_path, monkeypatch):
    """``--out runs/x`` and then ``--out $PWD/runs/x`` resume one run: path fields (``*_dir``,
    ``init_from``) naming the same file are equal; another path, or another field, is not."""
    monkeypatch.chdir(tmp_path)
    run = RunDir(tmp_path / "runs" / "x")
    run.log_metrics(1, {"loss": 1.0})
    run.write_config({"sft_dir": "runs/x/sft", "init_from": "ckpt", "label": "runs/x"})
    run.write_config({"sft_dir": str(tmp_path / "runs/x/sft"), "init_from": "./ckpt/",
                      "label": "runs/x"})
    with pytest.raises(runs.ConfigError, match="differing fields: sft_dir —"):
        run.write_config({"sft_dir": "runs/y/sft", "init_from": "ckpt", "label": "runs/x"})
    with pytest.raises(runs.ConfigError, match="differing fields: label —"):
        run.write_config({"sft_dir": "runs/x/sft", "init_from": "ckpt",
                          "label": str(tmp_path / "runs/x")})
    with pytest.raises(runs.ConfigError, match="differing fields: sft_dir —"):
        run.write_config({"sft_dir": "", "init_from": "ckpt", "label": "runs/x"})


def test_run_dir_metrics_jsonl(tmp_path):
    run = RunDir(tmp_path)
    run.log_metrics(0, {"loss": jnp.float32(2.5), "acc": np.float64(0.5), "n": 3})
    run.log_metrics(jnp.int32(10), {"loss": 1.25, "vec": np.array([1.0, 2.0])})
    run.log_timing(stage="sft", seconds=1.5)
    rows = read_metrics(tmp_path)
    assert rows == [{"step": 0, "loss": 2.5, "acc": 0.5, "n": 3},
                    {"step": 10, "loss": 1.25, "vec": [1.0, 2.0]}]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = _strict_json(line)
        assert "time" not in row                     # no wall-clock in metrics
    timing = [_strict_json(x) for x in (tmp_path / "timings.jsonl").read_text().splitlines()]
    assert timing[0]["stage"] == "sft" and timing[0]["seconds"] == 1.5 and "time" in timing[0]
    run.write_jsonl("samples.jsonl", [{"a": np.int64(1)}, {"a": 2}])
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [_strict_json(x) for x in lines] == [{"a": 1}, {"a": 2}]


def test_run_dir_python_nan_is_written_as_valid_json(tmp_path):
    run = RunDir(tmp_path)
    run.log_metrics(1, {"loss": float("nan"), "kl": float("inf")})
    row = _strict_json((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 1, "loss": "nan", "kl": "inf"}


def test_run_dir_array_nan_is_written_like_python_nan(tmp_path):
    run = RunDir(tmp_path)
    run.log_metrics(1, {"loss": jnp.float32(jnp.nan)})
    row = _strict_json((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 1, "loss": "nan"}


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def state():
    """A TrainState whose optimizer moments and counts are non-trivial (random values)."""
    _, params = create_model(preset("test"), jax.random.key(0))
    st = TrainState.create(params, make_optimizer(OptimConfig(warmup_steps=0), 10))
    rng = np.random.default_rng(1)

    def fill(x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            return jnp.asarray(rng.normal(size=x.shape).astype(x.dtype))
        return jnp.asarray(np.full(x.shape, 7, x.dtype))

    return st.replace(step=jnp.asarray(7, jnp.int32), opt_state=jax.tree.map(fill, st.opt_state))


def _shifted(st, k):
    return st.replace(step=st.step + k, params=jax.tree.map(lambda x: x + k, st.params))


def _assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_checkpointer_round_trip_and_keep_last_n(tmp_path, state):
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    assert ckpt.latest_step() is None
    saved = {}
    for k in (1, 2, 3):
        saved[k] = _shifted(state, k)
        ckpt.save(k * 10, saved[k], extra={"data_step": k, "key": [k, 2 * k]})
    ckpt.wait()
    assert ckpt.latest_step() == 30
    steps_on_disk = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert steps_on_disk == [20, 30]                 # keep-last-2
    target = _shifted(state, 100)                     # values are ignored, structure is used
    restored, extra = ckpt.restore(target)
    _assert_bit_equal(restored, saved[3])
    assert isinstance(restored, TrainState) and restored.tx is target.tx
    assert extra == {"data_step": 3, "key": [3, 6]}
    older, extra2 = ckpt.restore(target, step=20)
    _assert_bit_equal(older, saved[2])
    assert extra2["data_step"] == 2
    # abstract targets work too
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    again, _ = ckpt.restore(abstract)
    _assert_bit_equal(again, saved[3])
    ckpt.close()
    # a new Checkpointer on the same directory (a resumed process) sees the same checkpoints
    ckpt2 = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    assert ckpt2.latest_step() == 30
    _assert_bit_equal(ckpt2.restore(target)[0], saved[3])
    ckpt2.close()


def test_checkpointer_restore_from_empty_dir_raises(tmp_path, state):
    ckpt = Checkpointer(tmp_path / "empty", async_save=False)
    with pytest.raises(FileNotFoundError):
        ckpt.restore(state)
    ckpt.close()


def test_save_and_load_params_round_trip(tmp_path, state):
    params = state.params
    save_params(tmp_path / "params", params)
    _, target = create_model(preset("test"), jax.random.key(5))   # other values, same structure
    loaded = load_params(tmp_path / "params", target)
    _assert_bit_equal(loaded, params)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded),
                                jax.tree.map(np.asarray, params))
    # overwriting an existing directory works, and leaves nothing beside it
    save_params(tmp_path / "params", _shifted(state, 1).params)
    _assert_bit_equal(load_params(tmp_path / "params", target), _shifted(state, 1).params)
    assert os.listdir(tmp_path) == ["params"]


def _tiny_params(k):
    return {"b": jnp.full((3,), k, jnp.int32), "w": jnp.arange(6.0).reshape(2, 3) + k}


def _which_params(path):
    """Which :func:`_tiny_params` ``load_params`` reads at ``path`` (an error if none)."""
    got = load_params(path, _tiny_params(9))
    ks = [k for k in range(3) if all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
                                     for x, y in zip(jax.tree.leaves(got),
                                                     jax.tree.leaves(_tiny_params(k))))]
    assert len(ks) == 1, got
    return ks[0]


def _resave_finishes_cleanly(run):
    """Saving again over what a killed save left reads the new parameters and leaves only
    ``params/``."""
    save_params(run / "params", _tiny_params(2))
    assert _which_params(run / "params") == 2
    assert os.listdir(run) == ["params"]


def test_params_re_saved_and_killed_at_any_point_read_old_or_new(tmp_path, monkeypatch):
    """A finished stage's parameters are re-saved (a rerun): whatever the save has done to the
    run directory before each rename or delete — and halfway through each delete — is what a
    kill there leaves. From every such state ``load_params`` reads the old or the new parameters
    whole, and saving again reads the newest and leaves nothing beside them."""
    run = tmp_path / "run"
    save_params(run / "params", _tiny_params(0))
    kills = []

    def snapshot(partial=None):
        dest = tmp_path / f"kill{len(kills)}"
        shutil.copytree(run, dest, symlinks=True)
        if partial is not None:   # a kill mid-delete: the first half of its files are gone
            files = sorted(p for p in (dest / partial.relative_to(run)).rglob("*") if p.is_file())
            for f in files[:max(1, len(files) // 2)]:
                f.unlink()
        kills.append(dest)

    def in_run(p):
        return Path(p).resolve().parent == run.resolve()

    real_rename, real_replace, real_rmtree = os.rename, os.replace, shutil.rmtree

    def rename(src, dst, *a, **k):
        if in_run(src) or in_run(dst):
            snapshot()
        return real_rename(src, dst, *a, **k)

    def replace(src, dst, *a, **k):
        if in_run(src) or in_run(dst):
            snapshot()
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if in_run(path) and Path(path).exists():
            snapshot()
            snapshot(partial=Path(path).resolve())
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    save_params(run / "params", _tiny_params(1))
    monkeypatch.undo()
    assert _which_params(run / "params") == 1 and os.listdir(run) == ["params"]
    read = [_which_params(dest / "params") for dest in kills]
    assert len(kills) >= 3 and set(read) == {0, 1}, read   # the kills straddle the swap
    for dest in kills:
        _resave_finishes_cleanly(dest)


_KILLED_SAVE = """
import os, shutil, signal, sys
from pathlib import Path
import jax.numpy as jnp
from rlhf_jax.checkpoint import save_params

path = Path(sys.argv[1]).resolve()

def kill_after(fn):   # SIGKILL right after the first call that moves or deletes `path`
    def wrapped(src, *a, **k):
        out = fn(src, *a, **k)
        if Path(src).resolve() == path:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapped

os.rename, os.replace = kill_after(os.rename), kill_after(os.replace)
shutil.rmtree = kill_after(shutil.rmtree)
save_params(path, {"b": jnp.full((3,), 1, jnp.int32), "w": jnp.arange(6.0).reshape(2, 3) + 1})
"""


def test_params_re_save_killed_by_sigkill_keeps_old_or_new_params(tmp_path):
    """A real ``kill -9`` of a process re-saving a finished stage's parameters right after it
    moved or deleted the old ``params/`` (no ``params/`` is left): ``load_params`` still reads
    the old or the new ones whole (the old code had deleted them: nothing to read), and saving
    again reads the newest and leaves nothing beside them. (Every other kill point: above.)"""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))
    save_params(tmp_path / "params", _tiny_params(0))
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path / "params")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "params").exists()
    assert _which_params(tmp_path / "params") in (0, 1)
    _resave_finishes_cleanly(tmp_path)


def test_ppo_run_writes_judged_samples_of_every_logged_iteration():
    """The shared tiny PPO run logs every iteration: each wrote its first few rollout samples,
    which the reader returns in order, and whose gold scores the task's judge gives again."""
    from rlhf_jax import tiny
    from rlhf_jax.stages.common import pipeline_task, read_config
    from rlhf_jax.stages.ppo import SAMPLES_PER_LOG
    from rlhf_jax.stages.reward import RewardConfig

    run = runs.load_run(tiny.tiny_run("ppo"))
    rows = run.iteration_samples()
    assert [r["iteration"] for r in rows] == [i for i in (1, 2, 3, 4)
                                              for _ in range(SAMPLES_PER_LOG)]
    assert run.iteration_samples(3) == rows[2 * SAMPLES_PER_LOG:3 * SAMPLES_PER_LOG]
    assert run.iteration_samples(9) == [] and "samples" not in run.sample_names()
    task = pipeline_task(read_config(run.config["reward_dir"], RewardConfig).sft.pretrain)
    prompts = {p.uid: p for p in task.prompts("train")}
    for r in rows:
        assert r["prompt"] == prompts[r["uid"]].text and np.isfinite(r["rm_score"])
        j = task.judge(prompts[r["uid"]], r["response"])
        assert (j.label, j.score) == (r["label"], r["gold"])


def test_a_sweep_cell_refused_at_run_time_starts_afresh(tmp_path, monkeypatch):
    """A sweep cell's claim (``sweep_cell.json``, written before its run) is no work: a cell
    whose run refused a malformed data row reruns with the file fixed (it was refused as a
    resumed run whose data changed)."""
    from rlhf_jax.sweep import CELL_FILE

    monkeypatch.setattr(runs, "_git_commit", lambda: "start")
    cell = tmp_path / "beta=0.1" / "seed0"
    cell.mkdir(parents=True)
    (cell / CELL_FILE).write_text('{"script": "reward", "config": {}}')
    run = RunDir(cell)
    run.write_config({"steps": 3})
    run.write_meta(seed=0, extra={"data": {"files": {"train.jsonl": "d1"}}})
    assert not run.started() and not RunDir(tmp_path).started()
    run.write_meta(seed=0, extra={"data": {"files": {"train.jsonl": "d2"}}})
    assert json.loads((cell / "meta.json").read_text())["data"]["files"] == {"train.jsonl": "d2"}
    run.log_metrics(1, {"loss": 1.0})
    with pytest.raises(runs.ConfigError, match="files changed since"):
        run.write_meta(seed=0, extra={"data": {"files": {"train.jsonl": "d3"}}})


def test_write_jsonl_keeps_the_previous_file_until_the_new_one_is_complete(tmp_path):
    """Samples files are rewritten when a finished run's evaluation is redone: a write cut
    short leaves the previous complete file beside the old summary, not a truncated one."""
    run = RunDir(tmp_path)
    run.write_jsonl("samples_sft.jsonl", [{"i": 0}, {"i": 1}])

    def cut_short():
        yield {"i": 2}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.write_jsonl("samples_sft.jsonl", cut_short())
    assert runs.read_jsonl(tmp_path / "samples_sft.jsonl") == [{"i": 0}, {"i": 1}]
    run.write_jsonl("samples/iter_0001.jsonl", [{"i": 3}])
    assert runs.read_jsonl(tmp_path / "samples" / "iter_0001.jsonl") == [{"i": 3}]
