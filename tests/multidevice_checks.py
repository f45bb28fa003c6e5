"""Sharded = single device, for the SFT step, the RM step and a PPO iteration.

Run in a process that sees 4 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``);
``tests/test_parallel.py`` does that:

    python multidevice_checks.py [FAMILY ...] [--save-ppo OUT.pkl]

runs the checks of each family (default ``gpt2 llama``): on GPT-2 the SFT (replicated and FSDP),
RM, PPO, GRPO / online DPO and DAPO checks, on a Llama-family model (grouped-query attention, q/k norms,
biases) the SFT (replicated and FSDP: its own parameter shapes) and RM checks, in one process (JAX
starts once). The sharded PPO iteration is the same per-shard code for either family (the model
is called per example); Llama's sampling and scoring are checked on one device in
test_sampling.py / test_hf.py. Each check runs the same step
on a 4-device mesh and on a 1-device mesh with the same global batch and key and compares
parameters and metrics. Shards hold different numbers of counted tokens on purpose (a pmean of
per-shard means would fail). ``--save-ppo`` pickles GPT-2's 1-device PPO result, the reference of
the two-process check (``multiprocess_checks.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.lm import lm_with_replay_loss_fn
from rlhf_jax.models import create_model, preset
from jax.sharding import PartitionSpec as P

from rlhf_jax.parallel import (AXIS, data_parallel, fsdp_specs, make_fsdp_train_step, make_mesh,
                               place, replicate, shard_batch, state_specs, to_host,
                               unshard)
from rlhf_jax.rl.kl_control import RunningMoments
from rlhf_jax.rl.ppo import Frozen, Models, PPOHParams, PPOState
from rlhf_jax.stages.ppo import sharded_iteration
from rlhf_jax.stages.reward_model import kwise_rm_loss_fn, make_score_fn
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer, make_train_step

# one layer: sharding treats every layer alike, and each layer is compiled once more per program
FAMILIES = {
    "gpt2": (preset("test", vocab_size=32, max_len=24, n_layers=1), (1e-5, 1e-6)),
    # Adam turns ~1e-7 reduction-order differences of tiny gradients into up to ~2e-6 (seen once
    # in 1,024 elements of a q_proj kernel); a sharding bug would be off by orders more
    "llama": (preset("llama-test", vocab_size=32, max_len=24, n_layers=1, qk_norm=True,
                     qkv_bias=True), (1e-5, 5e-6)),
}
CFG, (RTOL, ATOL) = FAMILIES["gpt2"]


def use(family: str) -> None:
    """Run the checks below on ``family``'s model and tolerances."""
    global CFG, RTOL, ATOL
    CFG, (RTOL, ATOL) = FAMILIES[family]
# eps keeps Adam from turning float-rounding noise in ~0 gradients into full-size steps
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=0, eps=1e-4)


def copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def close(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=what)


def lm_rows(rng, n, t):
    tokens = rng.integers(3, 32, (n, t)).astype(np.int32)
    lengths = rng.integers(2, t + 1, n)           # different counted tokens per shard
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = mask * (np.arange(t)[None] >= rng.integers(0, 3, n)[:, None])
    return {"tokens": tokens * mask, "attention_mask": mask, "loss_mask": loss_mask}


def train_twice(mesh, loss_fn, params, batch, fsdp=False):
    optim = dataclasses.replace(OPTIM, clip_norm=0.0) if fsdp else OPTIM
    state = TrainState.create(copy(params), make_optimizer(optim, 10))
    loss_fn = functools.partial(loss_fn, axis_name=AXIS)
    if fsdp:
        specs = fsdp_specs(state.params, mesh)
        assert any(s != P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
        state_spec = state_specs(state, specs)
        train_step = make_fsdp_train_step(loss_fn, specs, clip_norm=OPTIM.clip_norm)
    else:
        state_spec, train_step = P(), make_train_step(loss_fn)
    state = place(state, mesh, state_spec)
    step = data_parallel(train_step, mesh, state_spec=state_spec)
    batch = shard_batch(batch, mesh)
    for s in range(2):
        state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(0), s))
    if fsdp:   # the moments really are split: each device holds 1/4 of the largest matrix
        big = max(jax.tree.leaves(state.params), key=lambda x: x.size)
        assert big.addressable_shards[0].data.size * 4 == big.size, big.sharding
    return jax.device_get(unshard(state.params, mesh)), jax.device_get(metrics)


def check_sft(mesh4, mesh1):
    rng = np.random.default_rng(0)
    model, params = create_model(CFG, jax.random.key(1))
    batch = {"sft": lm_rows(rng, 8, 12), "ptx": lm_rows(rng, 4, 12)}
    loss = functools.partial(lm_with_replay_loss_fn, model=model, ptx_coef=0.5)
    a, b = train_twice(mesh4, loss, params, batch), train_twice(mesh1, loss, params, batch)
    close(a, b, "sft")
    close(train_twice(mesh4, loss, params, batch, fsdp=True), b, "sft fsdp")


def check_rm(mesh4, mesh1):
    rng = np.random.default_rng(1)
    model, params = create_model(CFG, jax.random.key(2), heads=("reward",))
    p, k, lp, lr = 8, 3, 5, 6
    plen = rng.integers(1, lp + 1, p)
    pmask = (np.arange(lp)[None] >= lp - plen[:, None]).astype(np.int32)
    rlen = rng.integers(1, lr + 1, (p, k))
    rmask = (np.arange(lr)[None, None] < rlen[..., None]).astype(np.int32)
    batch = {"prompts": rng.integers(3, 32, (p, lp)).astype(np.int32) * pmask,
             "prompt_mask": pmask,
             "responses": rng.integers(3, 32, (p, k, lr)).astype(np.int32) * rmask,
             "response_mask": rmask,
             "ranking": rng.permutation(np.tile(np.arange(k, dtype=np.float32), (p, 1)).T).T}
    loss = functools.partial(kwise_rm_loss_fn, score=make_score_fn(model, prompt_len=lp))
    close(train_twice(mesh4, loss, params, batch), train_twice(mesh1, loss, params, batch), "rm")


def ppo_setup():
    """Models, hyperparameters, initial state and a host batch for a small PPO iteration."""
    policy, p_params = create_model(CFG, jax.random.key(3))
    _, ref_params = create_model(CFG, jax.random.key(4))
    rm, rm_params = create_model(CFG, jax.random.key(5), heads=("reward",))
    value, v_params = create_model(CFG, jax.random.key(6), heads=("value",))
    models = Models(policy=policy, ref=policy, rm=make_score_fn(rm, prompt_len=6), value=value)
    # the entropy controller's target lies above the random policy's entropy (≈ 3.4 nats), so
    # its coefficient c = I + K_p·(H* − H) is inside (0, c_max) and depends on the global mean H
    hp = PPOHParams(prompts_per_iter=8, epochs=2, minibatches=2, kl_coef=0.1, ptx_coef=0.3,
                    scale_rewards=True, adaptive_kl=True, kl_target=0.5, kl_horizon=100.0,
                    entropy_target=6.0, entropy_kp=0.01, entropy_ki=0.005, entropy_coef_max=0.2)
    rng = np.random.default_rng(2)
    lp = 6
    plen = rng.integers(1, lp + 1, 8)
    pmask = (np.arange(lp)[None] >= lp - plen[:, None]).astype(np.int32)
    ptx = lm_rows(rng, hp.epochs * hp.minibatches * 4, 10)
    batch = {"prompts": rng.integers(3, 32, (8, lp)).astype(np.int32) * pmask,
             "prompt_mask": pmask, "example_ids": np.arange(8),
             "ptx": {k: v.reshape(hp.epochs * hp.minibatches, 4, 10) for k, v in ptx.items()}}
    opt = make_optimizer(OPTIM, 8)
    state = PPOState(policy=TrainState.create(copy(p_params), opt),
                     value=TrainState.create(copy(v_params), opt),
                     kl_coef=jnp.asarray(0.1, jnp.float32), reward_moments=RunningMoments.create(),
                     step=jnp.zeros((), jnp.int32), entropy_coef=jnp.zeros((), jnp.float32))
    return models, hp, (state, Frozen(ref=copy(ref_params), rm=copy(rm_params))), batch


def group_setup(hp):
    """``ppo_setup`` with a critic-free group preset ``hp`` (G samples of each of the 8 prompts;
    each of 4 devices holds the samples of 2 whole prompts)."""
    models, _, (state, frozen), batch = ppo_setup()
    batch = {k: v for k, v in batch.items() if k != "ptx"}
    batch["example_ids"] = np.arange(hp.rollout_size)
    return dataclasses.replace(models, value=None), hp, (state.replace(value=None), frozen), batch


def ppo_run(mesh, iterations=2, setup=ppo_setup):
    """Two sharded PPO iterations over ``mesh``: (trainable state, per-iteration metrics), on
    the host of every process."""
    models, hp, (state, frozen), batch = setup()
    it = sharded_iteration(models, hp, mesh, max_new_tokens=8, eos_id=2, pad_id=0)
    state, frozen = replicate(state, mesh), replicate(frozen, mesh)
    out = []
    for i in range(iterations):
        state, metrics, rollout = it(state, frozen, batch, jax.random.fold_in(jax.random.key(9), i))
        out.append(to_host(dict(metrics, rollout=rollout)))
    return jax.device_get(jax.tree.leaves(state)), out


def compare_ppo(a, b):
    (s_a, m_a), (s_b, m_b) = a, b
    for x, y in zip(m_a, m_b):
        np.testing.assert_array_equal(x["rollout"]["responses"], y["rollout"]["responses"])
        for key in x:
            if key != "rollout":
                np.testing.assert_allclose(x[key], y[key], rtol=1e-4, atol=1e-5, err_msg=key)
    close(s_a, s_b, "ppo state")


def check_ppo(mesh4, mesh1, save=None):
    """PPO with ptx, reward scaling, adaptive KL and the adaptive entropy controller (its
    coefficient is set from the global mean entropy; ``compare_ppo`` compares it)."""
    single = ppo_run(mesh1)
    coefs = [m["entropy/coef"] for m in single[1]]
    assert 0 < coefs[0] < coefs[1] < 0.2, coefs   # moving, inside its bounds
    compare_ppo(ppo_run(mesh4), single)
    if save:
        with open(save, "wb") as f:
            pickle.dump(single, f)


def dapo_setup(hp):
    """``group_setup`` for DAPO, whose RM scores 0 whenever the prompt's last token is 3; 5 of the
    8 prompts end in 3, so those groups have no reward spread and dynamic sampling keeps groups
    1, 4, 7 (moved across devices) and pads with group 0 (weight 0)."""
    models, hp, (state, frozen), batch = group_setup(hp)
    score = models.rm
    prompts = batch["prompts"].copy()
    prompts[:, -1] = np.where(np.isin(np.arange(8), [0, 2, 3, 5, 6]), 3, 4)
    lp = prompts.shape[1]

    def gated(params, tokens, mask):
        return score(params, tokens, mask) * (tokens[:, lp - 1] != 3)

    state = state.replace(kl_coef=jnp.asarray(hp.kl_coef, jnp.float32))   # hp's β
    return dataclasses.replace(models, rm=gated), hp, (state, frozen), dict(batch, prompts=prompts)


def check_dapo(mesh4, mesh1):
    """DAPO's dynamic sampling (one selection of groups on the global batch, then each device's
    share of the selected rows; clip-higher), run with GRPO's per-sequence means and k3 in the
    loss (std-normalised groups as both): 4 devices = 1 device, and the fill rate is 3/4. One
    compiled pair covers the group methods: every group stays on one device. (Online DPO's pair
    selection on two halves of a batch = on the whole batch is test_online_dpo.py's check;
    RLOO's leave-one-out baseline is group-local and its budget normaliser, like GSPO's and
    REINFORCE++'s global reductions, is checked sharded under vmap in test_group.py and
    test_zoo2.py.)"""
    from rlhf_jax.rl.presets import dapo_hparams

    global ATOL
    saved, ATOL = ATOL, 5e-6   # Adam noise as for Llama (seen: 1.6e-6 in 1 of 4,096 elements)
    hp = dapo_hparams(prompts_per_iter=8, keep_groups=4, minibatches=2, overlong_buffer=0,
                      loss_aggregation="sequence", kl_in_loss="k3", kl_coef=0.04)
    setup = functools.partial(dapo_setup, hp)
    a, b = ppo_run(mesh4, setup=setup), ppo_run(mesh1, setup=setup)
    compare_ppo(a, b)
    assert [m["rollout/fill_rate"] for m in b[1]] == [0.75, 0.75], b[1]
    ATOL = saved


CHECKS = {"gpt2": (check_sft, check_rm, check_ppo, check_dapo),
          "llama": (check_sft, check_rm)}


def main(argv: list[str]) -> int:
    save = None
    if "--save-ppo" in argv:
        i = argv.index("--save-ppo")
        save, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    assert len(jax.devices()) == 4, jax.devices()
    mesh4, mesh1 = make_mesh(), make_mesh(jax.devices()[:1])
    for family in argv or ["gpt2", "llama"]:
        use(family)
        for check in CHECKS[family]:
            if check is check_ppo and family == "gpt2":
                check(mesh4, mesh1, save=save)
            else:
                check(mesh4, mesh1)
            print(family, check.__name__, "ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
