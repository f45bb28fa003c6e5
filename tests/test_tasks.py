"""The task registry, the stages' independence of any concrete task, and a user task (README's)
through the whole pipeline."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from rlhf_jax.configs import ConfigError
from rlhf_jax.data.facts_world import FactsWorld, FactsWorldConfig
from rlhf_jax.data.tokenizers import WordTokenizer
from rlhf_jax.scripts import load
from rlhf_jax.tasks import TASKS, TaskConfig, build_task, task_config

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module a file imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_stages_and_evaluation_import_no_concrete_task():
    files = sorted((ROOT / "rlhf_jax" / "stages").glob("*.py")) + [
        ROOT / "rlhf_jax" / "evaluate.py", ROOT / "rlhf_jax" / "labeler.py"]
    assert len(files) > 8
    for f in files:
        bad = {m for m in _imports(f) if m.startswith("rlhf_jax.data.facts_world")
               or m == "rlhf_jax.data.FactsWorld"}
        assert not bad, (f.name, bad)
        assert "FactsWorld" not in f.read_text(), f.name


def test_evaluation_loads_no_concrete_task_even_indirectly():
    import subprocess
    import sys

    code = ("import sys, rlhf_jax.evaluate, rlhf_jax.labeler, rlhf_jax.rl.ppo; "
            "print('rlhf_jax.data.facts_world' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_checker_sees_an_import():
    """The check above can fail: it finds the import a stage used to have."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.py"
        p.write_text("from rlhf_jax.data.facts_world import FactsWorld\nimport rlhf_jax.tasks\n")
        assert "rlhf_jax.data.facts_world" in _imports(p) and "rlhf_jax.tasks" in _imports(p)


def test_default_task_is_the_facts_world_built_from_its_own_config():
    cfg = TaskConfig(world=FactsWorldConfig(n_real=10, n_fictional=10))
    task = build_task(cfg)
    assert isinstance(task, FactsWorld) and task.cfg == cfg.world
    assert task_config(cfg) is cfg.world
    assert task.prompts("heldout") == FactsWorld(cfg.world).prompts("heldout")


def test_tokenizer_override_replaces_the_tasks_own():
    cfg = TaskConfig(world=FactsWorldConfig(n_real=10, n_fictional=10))
    own = build_task(cfg).tokenizer
    other = WordTokenizer(list(own.vocab[3:]) + ["extra"])
    task = build_task(cfg, tokenizer=other)
    assert task.tokenizer is other and other.vocab_size == own.vocab_size + 1
    assert task.prompts("train") == build_task(cfg).prompts("train")   # the task is unchanged


def test_unknown_task_and_bad_options_name_the_field():
    with pytest.raises(ConfigError, match="`name`.*unknown task 'nope'"):
        TaskConfig(name="nope")
    with pytest.raises(ConfigError, match="`options`"):
        TaskConfig(options={"n_real": "3"})


def _echo():
    """README's user task, registered by running its code block."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Your own task"):]
    scope: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), scope)
    return scope


@pytest.fixture
def echo():
    scope = _echo()
    yield scope
    TASKS.pop("echo", None)


def test_user_task_options_are_converted_and_checked(echo):
    cfg = TaskConfig(name="echo", options={"n_prompts": "8", "p_wrong": "0.5"})
    task = build_task(cfg)
    assert task.cfg == echo["EchoConfig"](n_prompts=8, p_wrong=0.5)
    assert len(task.prompts("train")) == 8
    with pytest.raises(ConfigError, match="`options.colours`.*not a field of EchoConfig"):
        TaskConfig(name="echo", options={"colours": "3"})
    with pytest.raises(ConfigError, match="`options.n_prompts`.*not a int"):
        TaskConfig(name="echo", options={"n_prompts": "many"})
    # the task's own checks (a ValueError of its config class) name the options
    with pytest.raises(ConfigError, match=r"`options`: EchoConfig: n_prompts >= 0 .*n_prompts=-3"):
        TaskConfig(name="echo", options={"n_prompts": "-3"})
    # its own judge and summary
    p = task.prompts("heldout")[0]
    c = p.info["colour"]
    other = next(x for x in echo["COLOURS"] if x != c)
    js = [task.judge(p, r) for r in (f"{c} .", f"{other} .", "say", "")]
    assert [j.label for j in js] == ["right", "wrong", "malformed", "malformed"]
    assert task.summarize([p] * 4, js) == pytest.approx(
        {"gold": -1.0, "top_rate": 0.25, "wrong_rate": 0.25})


def test_a_task_without_held_out_prompts_is_refused_before_any_work(echo, tmp_path, capsys):
    """``n_prompts 0``: the evaluation averaged nothing and reported gold 0 (a silent, wrong
    number); refused before any work instead, naming the task."""
    out = tmp_path / "pt"
    with pytest.raises(SystemExit) as e:
        load("pretrain").main(["--out", str(out), "--task.name", "echo", "--task.options",
                               "n_prompts", "0", "--steps", "2", "--batch-size", "2",
                               "--seq-len", "16", "--model.d-model", "16", "--model.n-layers",
                               "1", "--model.n-heads", "2", "--optim.warmup-steps", "1"])
    assert e.value.code == 2
    assert "config field `task`: task 'echo' has no held-out prompts" in capsys.readouterr().err
    assert not out.exists()


def test_user_task_runs_the_whole_pipeline(echo, tmp_path):
    out = tmp_path / "pipe"
    args = ["--out", str(out), "--pretrain.task.name", "echo",
            "--pretrain.task.options", "n_prompts", "16", "--pretrain.task.max-new-tokens", "4",
            "--pretrain.steps", "30", "--pretrain.batch-size", "8", "--pretrain.seq-len", "16",
            "--pretrain.model.d-model", "32", "--pretrain.model.n-layers", "1",
            "--pretrain.model.n-heads", "2", "--pretrain.optim.warmup-steps", "5",
            "--pretrain.checkpoint-every", "0",
            "--sft.steps", "10", "--sft.batch-size", "8", "--sft.ptx-batch-size", "4",
            "--sft.optim.warmup-steps", "2",
            "--reward.steps", "6", "--reward.batch-prompts", "4",
            "--reward.optim.warmup-steps", "2",
            "--ppo.iterations", "2", "--ppo.ppo.prompts-per-iter", "8", "--ppo.ppo.epochs", "1",
            "--ppo.ppo.minibatches", "2", "--ppo.policy-optim.warmup-steps", "1",
            "--ppo.value-optim.warmup-steps", "1", "--ppo.eval-every", "1"]
    summary = load("pipeline").main(args)
    # the task's own metrics, for every evaluated policy; no facts-world metric anywhere
    assert -2.0 <= summary["gold/base"] <= 1.0
    for name in ("sft", "rlhf", "best_of_n"):
        assert -2.0 <= summary[f"gold/{name}"] <= 1.0, name
        assert 0.0 <= summary[f"wrong_rate/{name}"] <= 1.0, name
    assert "top_rate/rlhf" in summary and "win_rate/rlhf_vs_sft" in summary
    assert summary["kl/rlhf_vs_sft"] >= 0.0
    assert not any(k.startswith(("fabrication_rate", "knowledge", "accuracy")) for k in summary)
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().split("\n")
            if line]
    assert {"heldout/gold", "heldout/wrong_rate", "heldout/kl"} <= set(rows[-1])
    records = [json.loads(line) for line in
               (out / "ppo" / "samples_rlhf.jsonl").read_text().splitlines()]
    assert len(records) == 16 * 4 and {r["label"] for r in records} <= {"right", "wrong",
                                                                         "malformed"}
    cfg = json.loads((out / "pretrain" / "config.json").read_text())["task"]
    assert cfg["name"] == "echo" and cfg["options"] == {"n_prompts": "16"}
    assert "rm/gold_agreement" in summary

    # the method comparison on the same upstream, in the task's metrics
    cmp = load("compare").main([
        "--out", str(tmp_path / "cmp"), "--reward-dir", str(out / "reward"),
        "--methods", "dpo", "--seeds", "0", "--eval-points", "2",
        "--samples-per-iter", "8", "--ppo.iterations", "2", "--ppo.ppo.minibatches", "2",
        "--ppo.policy-optim.warmup-steps", "1", "--ppo.value-optim.warmup-steps", "1",
        "--offline.steps", "2", "--offline.batch-prompts", "4",
        "--offline.optim.warmup-steps", "1"])
    # (PPO on this task: the pipeline above; compare's online cells: tests/test_compare.py)
    assert {"dpo/gold", "dpo/wrong_rate", "dpo/wrong_at_kl"} <= set(cmp)
    assert "wrong_rate/sft" in cmp and not any("fabrication" in k for k in cmp)
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "| method | gold | wrong | win rate vs SFT |" in table
