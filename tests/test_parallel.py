"""Data parallelism: sharded = single device (4 simulated CPU devices), two processes = one,
the same experiment command on 1 or 2 devices (replicated or FSDP), and config-time errors."""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import TINY_PPO, TINY_PRETRAIN, TINY_SFT, shared_dir, xla_env
from rlhf_jax.configs import ConfigError
from rlhf_jax.parallel import check_divisible, fsdp_specs
from rlhf_jax.rl.ppo import PPOHParams
from rlhf_jax.scripts import EXPERIMENTS
from rlhf_jax.stages.ppo import PPOConfig, check_ppo_sharding

TESTS = Path(__file__).resolve().parent


def _env(devices: int) -> dict:
    return xla_env(devices, RLHF_JAX_NO_REEXEC="1", PYTHONPATH=str(TESTS))


def _run(args, devices, timeout=1800):
    out = subprocess.run([sys.executable, *args], env=_env(devices), cwd=TESTS, timeout=timeout,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def multidevice(tmp_path_factory):
    """One process with 4 devices runs every family's checks (JAX starts and compiles once) and
    saves GPT-2's 1-device PPO result for the two-process check: (stdout, that file)."""
    def build(out):
        out.mkdir(parents=True)
        run = _run(["multidevice_checks.py", "gpt2", "llama", "--save-ppo",
                    str(out / "single.pkl")], devices=4)
        (out / "stdout.txt").write_text(run.stdout)

    out = shared_dir(tmp_path_factory, "multidevice", build)
    return (out / "stdout.txt").read_text(), out / "single.pkl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(request, tmp_path):
    """jax.distributed on 127.0.0.1 (gloo), 2 processes x 2 devices, one sharded PPO iteration
    pair, against the same iterations in one process on one device."""
    sys.path.insert(0, str(TESTS))
    from multidevice_checks import compare_ppo

    port = str(_free_port())
    workers = [subprocess.Popen([sys.executable, "multiprocess_checks.py", str(i), port,
                                 str(tmp_path / f"w{i}.pkl")], env=_env(2), cwd=TESTS,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    try:   # the 1-device reference (if not made yet) while the workers run
        single = request.getfixturevalue("multidevice")[1]
    finally:
        logs = [w.communicate(timeout=1800)[0] for w in workers]
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log[-6000:]
    assert not (tmp_path / "w1.pkl").exists(), "only process 0 writes"
    with open(tmp_path / "w0.pkl", "rb") as f, open(single, "rb") as g:
        compare_ppo(pickle.load(f), pickle.load(g))


def test_sft_rm_ppo_steps_on_4_devices_equal_one_device(multidevice):
    """SFT (+ replay, replicated and FSDP), K-wise RM, a PPO iteration (ptx, reward scaling,
    adaptive KL), a group iteration (DAPO's dynamic sampling with GRPO's k3 and per-sequence
    means): parameters and metrics of a 4-device mesh equal those of 1 device."""
    lines = multidevice[0].splitlines()
    assert lines[:4] == [f"gpt2 {c} ok" for c in ("check_sft", "check_rm", "check_ppo",
                                                   "check_dapo")]


def test_llama_steps_on_4_devices_equal_one_device(multidevice):
    """The same for a Llama-family model (grouped-query attention, q/k norms, biases): SFT
    replicated and FSDP (the split of its own parameter shapes) and the RM step."""
    lines = multidevice[0].splitlines()
    assert lines[4:] == [f"llama {c} ok" for c in ("check_sft", "check_rm")]


def test_sft_command_on_two_devices_with_fsdp_ends_at_the_same_numbers(sft_run, tmp_path):
    """The same experiment command on 1 device (the session's tiny SFT run, in this process) and
    on 2 (parameters split FSDP-style) writes the same metrics, to float tolerance."""
    out = tmp_path / "d2"
    _run([str(EXPERIMENTS / "sft.py"), "--out", str(out), *TINY_PRETRAIN, *TINY_SFT, "--fsdp",
          "--pretrain.fsdp"], devices=2)
    runs = {}
    for devices, run in ((1, sft_run), (2, out)):
        meta = json.loads((run / "meta.json").read_text())
        assert len(meta["devices"]) == devices
        runs[devices] = [json.loads(r) for stage in ("pretrain/metrics.jsonl", "metrics.jsonl")
                         for r in (run / stage).read_text().splitlines()]
    assert [r.keys() for r in runs[1]] == [r.keys() for r in runs[2]]
    for a, b in zip(runs[1], runs[2]):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-3, atol=2e-4, err_msg=k)


def test_ppo_command_on_two_devices_evaluates_like_one(pipeline_run, tmp_path):
    """``experiments/ppo.py`` on 2 devices (policy replicated over the mesh, SFT reference loaded
    on one device) from the session pipeline's reward run: its held-out evaluations during
    training and at the end run, and every logged metric and summary number equals the
    pipeline's own 1-device PPO stage (same config) to float tolerance."""
    one = pipeline_run / "ppo"
    out = tmp_path / "d2"
    _run([str(EXPERIMENTS / "ppo.py"), "--out", str(out), "--reward-dir",
          str(pipeline_run / "reward"), *TINY_PPO], devices=2)
    assert json.loads((out / "config.json").read_text()) == \
        json.loads((one / "config.json").read_text())
    assert len(json.loads((out / "meta.json").read_text())["devices"]) == 2
    rows = {d: [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
            for d, run in ((1, one), (2, out))}
    assert [r.keys() for r in rows[1]] == [r.keys() for r in rows[2]]
    assert any("heldout/kl" in r for r in rows[2])
    summaries = [json.loads((run / "summary.json").read_text()) for run in (one, out)]
    numbers = [(a, b) for a, b in zip(rows[1], rows[2])] + [tuple(summaries)]
    for a, b in numbers:
        for k in a:
            if not k.startswith("time_s/") and a[k] is not None:   # "nan" is written as text
                np.testing.assert_allclose(float(b[k]), float(a[k]), rtol=2e-3, atol=2e-4,
                                           err_msg=k)


def _mesh(n):
    return SimpleNamespace(shape={"data": n})


def test_batches_that_do_not_split_over_devices_fail_at_config_time():
    with pytest.raises(ConfigError, match="batch_size.*10 does not divide over 4 devices"):
        check_divisible(10, _mesh(4), "batch_size")
    check_divisible(12, _mesh(4), "batch_size")
    with pytest.raises(ConfigError, match="ppo.prompts_per_iter"):
        check_ppo_sharding(PPOConfig(ppo=PPOHParams(prompts_per_iter=6, minibatches=2)), _mesh(4))
    with pytest.raises(ConfigError, match="ppo.minibatches"):
        check_ppo_sharding(PPOConfig(ppo=PPOHParams(prompts_per_iter=8, minibatches=4)), _mesh(4))
    dapo = dict(prompts_per_iter=16, group_size=4, critic="none", whiten_advantages=False)
    with pytest.raises(ConfigError, match="ppo.keep_groups.*6 does not divide over 4 devices"):
        check_ppo_sharding(PPOConfig(ppo=PPOHParams(**dapo, keep_groups=6, minibatches=1)),
                           _mesh(4))
    with pytest.raises(ConfigError, match="ppo.minibatches"):   # 8 kept groups × 4 / 4 devices
        check_ppo_sharding(PPOConfig(ppo=PPOHParams(**dapo, keep_groups=8, minibatches=16)),
                           _mesh(4))
    check_ppo_sharding(PPOConfig(ppo=PPOHParams(**dapo, keep_groups=8, minibatches=8)), _mesh(4))


def test_fsdp_specs_split_the_largest_divisible_dim_and_keep_small_leaves_whole():
    tree = {"w": np.zeros((6, 512)), "v": np.zeros((512, 6)), "odd": np.zeros((511, 3)),
            "b": np.zeros(512), "s": np.zeros(())}
    specs = fsdp_specs(tree, _mesh(4))
    assert specs == {"w": P(None, "data"), "v": P("data", None), "odd": P(), "b": P(), "s": P()}
    assert all(s == P() for s in jax.tree.leaves(fsdp_specs(tree, _mesh(1)),
                                                 is_leaf=lambda x: isinstance(x, P)))
