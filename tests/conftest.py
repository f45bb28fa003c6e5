"""What the test session shares: one persistent XLA compilation cache, and the tiny upstream runs
the end-to-end tests start from.

* The cache lives in a temporary directory made for this session (never ``~/.cache``) and is seen
  by every process the session starts: pytest-xdist workers, experiment scripts run as
  subprocesses (``RLHF_JAX_CACHE_DIR``) and the multi-device checks (``JAX_COMPILATION_CACHE_DIR``).
  The experiment scripts build fresh jitted functions on every ``main`` call, so without it each
  end-to-end run of the same tiny config compiles everything again.
* Every compile in the session (this process, xdist workers, subprocesses) runs with LLVM's
  optimisation passes off and XLA:CPU's legacy fusion emitters (:data:`TEST_XLA_FLAGS`): the
  test programs are tiny, so compiling them costs far more than running them. On one
  PPO-iteration test, measured side by side: 59 → 40 s of CPU with LLVM's passes off, and
  40 → 25 s with the legacy emitters too. Numbers are the same programs' up to float rounding;
  benchmarks and experiments never see these flags.
* Session fixtures (:func:`sft_run`, :func:`pipeline_run`) are built once per session, also
  under xdist: the first worker that needs one builds it under a file lock in the session's
  shared temporary directory and the others reuse it. Tests must not write into them (copy first).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

from rlhf_jax.scripts import load

CACHE_ENV = "RLHF_JAX_TEST_XLA_CACHE"
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")


def xla_env(devices: int | None = None, **extra: str) -> dict:
    """``os.environ`` for a subprocess: the session's XLA flags, plus ``devices`` simulated CPU
    devices when given."""
    flags = os.environ.get("XLA_FLAGS", "")
    if devices:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=flags.strip(), **extra)

TINY_PRETRAIN = [
    "--pretrain.steps", "30", "--pretrain.batch-size", "8", "--pretrain.seq-len", "32",
    "--pretrain.model.d-model", "32", "--pretrain.model.n-layers", "1",
    "--pretrain.model.n-heads", "2", "--pretrain.task.world.n-real", "12",
    "--pretrain.task.world.n-fictional", "12", "--pretrain.task.world.docs-per-person", "2",
    "--pretrain.log-every", "5", "--pretrain.checkpoint-every", "10",
    "--pretrain.optim.warmup-steps", "5",
]
TINY_SFT = ["--steps", "20", "--batch-size", "8", "--ptx-batch-size", "4", "--log-every", "5",
            "--optim.warmup-steps", "5"]
TINY_PPO = ["--iterations", "3", "--ppo.prompts-per-iter", "16", "--ppo.epochs", "1",
            "--ppo.minibatches", "2", "--policy-optim.warmup-steps", "1",
            "--value-optim.warmup-steps", "1", "--checkpoint-every", "2", "--eval-every", "2"]


def under(prefix: str, args: list[str]) -> list[str]:
    """``args`` with every flag moved under ``--<prefix>.`` (``--steps`` → ``--sft.steps``)."""
    return [f"--{prefix}.{a[2:]}" if a.startswith("--") else a for a in args]


SMALL_REWARD = ["--steps", "100", "--batch-prompts", "8", "--optim.warmup-steps", "5",
                "--optim.learning-rate", "2e-3"]
# the whole pipeline, pretrain → SFT → preferences + RM → PPO, on a config small enough for a test
# but with an SFT model that learns enough of the answer format to give pairs of different gold
# (so the RM beats chance and the later stages see informative rewards and evaluations)
SMALL_PIPELINE = [
    "--pretrain.steps", "150", "--pretrain.batch-size", "16", "--pretrain.seq-len", "32",
    "--pretrain.model.d-model", "64", "--pretrain.model.n-layers", "1",
    "--pretrain.task.world.n-real", "16", "--pretrain.task.world.n-fictional", "16",
    "--pretrain.task.world.docs-per-person", "4", "--pretrain.optim.warmup-steps", "10",
    "--sft.steps", "150", "--sft.batch-size", "16", "--sft.ptx-batch-size", "4",
    "--sft.optim.warmup-steps", "10",
    *under("reward", SMALL_REWARD), *under("ppo", TINY_PPO),
]


def pytest_configure(config):
    if not os.environ.get(CACHE_ENV):   # the controller (xdist workers inherit its environment)
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="rlhf_jax_xla_cache_")
        config.stash[_OWNED] = os.environ[CACHE_ENV]
    path = os.environ[CACHE_ENV]
    if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):   # before JAX starts its backend
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
    # subprocesses: experiment scripts read RLHF_JAX_CACHE_DIR (rlhf_jax.launch), bare JAX the rest
    os.environ.update(RLHF_JAX_CACHE_DIR=path, JAX_COMPILATION_CACHE_DIR=path,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_OWNED = pytest.StashKey[str]()
# the slowest modules go first, slowest first (test_parallel's subprocesses simulate 4 devices
# and 2 processes): under ``--dist loadscope`` the workers start on them and the small modules
# fill in at the end, instead of one worker finishing the session with a long module alone
# (measured test time per module, 2026-12-08: 172, 81, 67, 56, 50, 47, 43, 43, 42, 37, 35, 34,
# 32 and 32 s of a 1,147 s suite)
FIRST = ("test_parallel.py", "test_experiments.py", "test_ppo.py", "test_init_from.py",
         "test_response_ids.py", "test_reward_files.py", "test_group.py", "test_tasks.py",
         "test_faults.py", "test_notebooks.py", "test_compare.py", "test_hf.py",
         "test_shared_prompt.py", "test_benchmarks.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))   # stable within a rank


def pytest_unconfigure(config):
    path = config.stash.get(_OWNED, None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop(CACHE_ENV, None)


def shared_dir(tmp_path_factory, name: str, build) -> Path:
    """``<session tmp>/<name>``, made once per session by ``build(path)``: under xdist the first
    worker to ask builds it (holding a file lock), the others wait for it and reuse it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                  # shared by the workers of this session only
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """``experiments/sft.py`` on the tiny config (it pretrains first, into ``<run>/pretrain``)."""
    return shared_dir(tmp_path_factory, "sft_run", lambda out: load("sft").main(
        ["--out", str(out), *TINY_PRETRAIN, *TINY_SFT]))


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Path:
    """``experiments/pipeline.py`` on :data:`SMALL_PIPELINE`: ``<run>/{pretrain,sft,reward,ppo}``;
    the end-to-end tests of the later stages start from its ``reward`` run."""
    return shared_dir(tmp_path_factory, "pipeline_run", lambda out: load("pipeline").main(
        ["--out", str(out), *SMALL_PIPELINE]))


@pytest.fixture(scope="session")
def reward_run(pipeline_run) -> Path:
    """The pipeline's finished reward run (its SFT run is ``<run>/../sft``)."""
    return pipeline_run / "reward"
