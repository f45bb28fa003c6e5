"""``--init-from DIR``: the stages start from a Hugging Face checkpoint (GPT-2 and the Llama
family), end to end on tiny configs. The checkpoints are exported with ``save_pretrained`` (which
``test_hf.py`` checks transformers loads unchanged), with the task's vocabulary as their
``tokenizer.json``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax.data.facts_world import FactsWorldConfig
from rlhf_jax.data.tokenizers import HFTokenizer
from rlhf_jax.models import create_model, preset
from rlhf_jax.models.hf import load_pretrained, save_pretrained
from rlhf_jax.scripts import load
from rlhf_jax.tasks import TaskConfig, build_task

WORLD = dict(n_real=12, n_fictional=12, docs_per_person=2)
TASK_FLAGS = ["--pretrain.task.world.n-real", "12", "--pretrain.task.world.n-fictional", "12",
              "--pretrain.task.world.docs-per-person", "2"]
STAGES = ["--pretrain.steps", "0", "--pretrain.seq-len", "32",
          "--sft.steps", "10", "--sft.batch-size", "8", "--sft.ptx-batch-size", "4",
          "--sft.log-every", "5", "--sft.optim.warmup-steps", "2",
          "--reward.steps", "10", "--reward.batch-prompts", "4",
          "--reward.optim.warmup-steps", "2",
          "--ppo.iterations", "2", "--ppo.ppo.prompts-per-iter", "16", "--ppo.ppo.epochs", "1",
          "--ppo.ppo.minibatches", "2", "--ppo.policy-optim.warmup-steps", "1",
          "--ppo.value-optim.warmup-steps", "1"]


def _checkpoint(path: Path, cfg, *, eos_list: bool = False) -> Path:
    """A random model of ``cfg`` saved as an HF checkpoint with the tiny world's vocabulary;
    ``eos_list``: two EOS ids in its config, as Llama 3 lists end-of-text and end-of-turn."""
    tok = build_task(TaskConfig(world=FactsWorldConfig(**WORLD))).tokenizer
    model, params = create_model(cfg.replace(vocab_size=tok.vocab_size), jax.random.key(7))
    save_pretrained(path, model, params, tokenizer=tok)
    if eos_list:
        config = json.loads((path / "config.json").read_text())
        config["eos_token_id"] = [tok.eos_id, tok.vocab_size - 1]
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def imported_pipeline(request, tmp_path_factory):
    """Llama: the whole pipeline (SFT → RM → PPO) from its checkpoint; GPT-2: pretraining (0
    steps) and SFT from its checkpoint (``experiments/sft.py``): what is family-specific is the
    import, and the later stages load the SFT model whatever its family (the Llama run, and
    test_experiments.py for models trained here). Returns (family, checkpoint, the run
    directory holding ``pretrain/``, the SFT run, the summary)."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = (preset("test", max_len=32, n_layers=1) if request.param == "gpt2" else
           preset("llama-test", max_len=32, n_layers=1, qkv_bias=True, tie_embeddings=True))
    ckpt = _checkpoint(root / "ckpt", cfg, eos_list=request.param == "llama")
    out = root / "pipe"
    if request.param == "gpt2":
        sft = [f.replace("--sft.", "--", 1) for f in STAGES[STAGES.index("--sft.steps"):
                                                           STAGES.index("--reward.steps")]]
        summary = load("sft").main(["--out", str(out), "--pretrain.init-from", str(ckpt),
                                    *TASK_FLAGS, *STAGES[:4], *sft])
        return request.param, ckpt, out, out, summary
    summary = load("pipeline").main(["--out", str(out), "--init-from", str(ckpt), *TASK_FLAGS,
                                      *STAGES])
    return request.param, ckpt, out, out / "sft", summary


def test_pipeline_starts_from_the_checkpoint(imported_pipeline):
    """The stages from an imported checkpoint: the base model's parameters are the checkpoint's,
    its tokenizer is the task's, and meta.json records every file's sha256."""
    family, ckpt, out, sft_dir, summary = imported_pipeline
    keys = ("gold/base", "gold/sft") + (("gold/rlhf", "rm/gold_agreement", "kl/rlhf_vs_sft")
                                        if family == "llama" else ())
    for key in keys:
        assert key in summary, key
    meta = json.loads((out / "pretrain" / "meta.json").read_text())["init_from"]
    assert meta["path"] == str(ckpt.resolve())
    assert meta["architecture"] == {"gpt2": "GPT2LMHeadModel", "llama": "Qwen2ForCausalLM"}[family]
    assert set(meta["files"]) == {"config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json"}
    for name, digest in meta["files"].items():
        assert digest == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    # the pretraining stage ran no steps: its parameters are the checkpoint's, bit for bit
    from rlhf_jax.stages.common import load_stage
    from rlhf_jax.stages.lm import PretrainConfig

    _, model, params = load_stage(out / "pretrain", PretrainConfig)
    _, ref = load_pretrained(ckpt)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert type(model.cfg).__name__ == {"gpt2": "GPTConfig", "llama": "LlamaConfig"}[family]
    # samples were decoded with the checkpoint's tokenizer (a word-level tokenizer.json)
    tok = HFTokenizer.from_pretrained(ckpt)
    row = json.loads((sft_dir / "samples_sft.jsonl").read_text().splitlines()[0])
    assert set(row["response"].split()) <= set(tok.hf_tokenizer().get_vocab())
    if family == "llama":   # the whole pipeline ran with two EOS ids (sampler semantics: test_sampling)
        assert len(tok.eos_ids) == 2


def test_later_stages_on_the_imported_pipeline(imported_pipeline, tmp_path):
    """The critic-free online stage (GRPO) and the offline stage (DPO) run from the imported
    pipeline's reward run (Llama only: the stages do not depend on the family, and GPT-2 runs
    them in test_experiments.py; their other presets and losses differ in hyperparameters only,
    not in what they load)."""
    family, _, out, _, _ = imported_pipeline
    if family != "llama":
        pytest.skip("the Llama family covers the later stages")
    online = ["--iterations", "2", "--ppo.prompts-per-iter", "4", "--policy-optim.warmup-steps",
              "1"]
    for script in ("grpo",):
        s = load(script).main(["--out", str(tmp_path / script), "--reward-dir",
                                str(out / "reward"), *online])
        assert np.isfinite(s["gold/rlhf"]) and s["kl/rlhf_vs_sft"] >= 0.0
    for loss in ("dpo",):
        s = load("dpo").main(["--out", str(tmp_path / loss), "--reward-dir", str(out / "reward"),
                               "--loss", loss, "--steps", "4", "--batch-prompts", "4",
                               "--optim.warmup-steps", "1"])
        assert np.isfinite(s[f"gold/{loss}"]) and s[f"kl/{loss}_vs_sft"] >= 0.0


def test_init_from_errors_name_the_problem(tmp_path, capsys):
    """A reward model as the base policy, a vocabulary too small for the task's tokenizer (a
    checkpoint without tokenizer.json) and a missing directory are refused before anything is
    written, with a message naming the field."""
    rm, rm_params = create_model(preset("test", max_len=32), jax.random.key(0), heads=("reward",))
    save_pretrained(tmp_path / "rm", rm, rm_params)
    small, params = create_model(preset("test", max_len=32), jax.random.key(0))   # 64 ids
    save_pretrained(tmp_path / "small", small, params)
    for ckpt, message in (("rm", "holds a GPT2ForSequenceClassification; the base model must be "
                                 "a causal language model"),
                          ("small", "give the checkpoint a tokenizer.json"),
                          ("nope", "is not a directory")):
        with pytest.raises(SystemExit) as exc:
            load("sft").main(["--out", str(tmp_path / "out"), "--init-from",
                               str(tmp_path / ckpt), *TASK_FLAGS])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "init_from" in err and message in err, err
        assert not (tmp_path / "out").exists(), "a refused checkpoint must leave nothing behind"
