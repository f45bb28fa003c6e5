"""The sweep engine: overrides checked before any work, a 2 × 2 sweep killed and resumed to the
same index, the reader over the sweep."""

from __future__ import annotations

import functools
import json

import pytest

from rlhf_jax import scripts, sweep, tiny
from rlhf_jax.configs import ConfigError
from rlhf_jax.runs import load_sweep


def test_bad_override_fails_before_any_work_naming_the_field(tmp_path, monkeypatch, capsys):
    calls, real = [], scripts.load("ppo").run
    fake = functools.wraps(real)(lambda *a: calls.append(a))   # keeps run's config annotation
    monkeypatch.setattr(scripts.load("ppo"), "run", fake)
    for grid, field in ((("ppo.kl-cof=0.1",), "ppo.kl-cof"), (("ppo.kl-coef=abc",), "ppo.kl-coef"),
                        (("iterations=0",), "iterations")):
        with pytest.raises(ConfigError, match=field):
            sweep.sweep_cells(sweep.SweepConfig(script="ppo", grid=grid))
    with pytest.raises(SystemExit):
        scripts.load("sweep").main(["--out", str(tmp_path / "s"), "--script", "ppo",
                                    "--grid", "ppo.kl-coef=0.1,0.2", "ppo.clip=0.1"])
    err = capsys.readouterr().err
    assert "ppo.clip" in err and "has no such field" in err
    assert calls == [] and not (tmp_path / "s" / "index.jsonl").exists()
    cells = sweep.sweep_cells(sweep.SweepConfig(script="ppo", grid=("ppo.kl-coef=0.1,0.2",
                                                                    "normalize-rm=false")))
    assert [c.name for c in cells] == ["ppo.kl-coef=0.1,normalize-rm=false",
                                       "ppo.kl-coef=0.2,normalize-rm=false"]
    assert [c.config.ppo.kl_coef for c in cells] == [0.1, 0.2]
    assert not any(c.config.normalize_rm for c in cells)


def test_two_by_two_sweep_killed_and_resumed_to_the_same_index(tmp_path, monkeypatch):
    out = tmp_path / "sw"
    monkeypatch.chdir(tmp_path)   # a relative --out, as in README's commands
    argv = ["--out", "sw", "--script", "dpo", "--grid", "beta=0.1,0.5", "--seeds", "0", "1",
            "--", "--reward-dir", str(tiny.tiny_upstream()), "--steps", "2",
            "--batch-prompts", "4", "--optim.warmup-steps", "1", "--log-every", "1",
            "--checkpoint-every", "1"]
    dpo = scripts.load("dpo")
    real, started, killed = dpo.run, [], []

    @functools.wraps(real)
    def killed_at_third(cfg, run_dir):
        started.append(run_dir)
        if len(started) == 3 and not killed:
            killed.append(run_dir)
            raise KeyboardInterrupt
        return real(cfg, run_dir)

    monkeypatch.setattr(dpo, "run", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        scripts.load("sweep").main(argv)
    first = (out / "index.jsonl").read_text().splitlines()
    assert [json.loads(r)["dir"] for r in first] == [str(p.resolve()) for p in started[:2]]
    done = {p: (p / "summary.json").stat().st_mtime_ns for p in started[:2]}

    started.clear()
    summary = scripts.load("sweep").main(argv)   # resumed: only the two missing runs run
    assert summary["runs"] == 4 and len(started) == 2
    assert {p: (p / "summary.json").stat().st_mtime_ns for p in done} == done
    index = [json.loads(r) for r in (out / "index.jsonl").read_text().splitlines()]
    assert [(r["cell"], r["seed"]) for r in index] == [
        ("beta=0.1", 0), ("beta=0.1", 1), ("beta=0.5", 0), ("beta=0.5", 1)]
    for r in index:
        s = json.loads((out / r["cell"] / f"seed{r['seed']}" / "summary.json").read_text())
        assert r["gold/dpo"] == s["gold/dpo"] and r["kl/dpo_vs_sft"] == s["kl/dpo_vs_sft"]
        cfg = json.loads((out / r["cell"] / f"seed{r['seed']}" / "config.json").read_text())
        assert cfg["beta"] == float(r["overrides"]["beta"]) and cfg["seed"] == r["seed"]
    assert index[0]["gold/dpo"] != index[1]["gold/dpo"] or \
        index[0]["kl/dpo_vs_sft"] != index[1]["kl/dpo_vs_sft"]
    # a run interrupted after its last checkpoint resumes there: the index comes out the same
    before = (out / "index.jsonl").read_text()
    (out / "beta=0.5" / "seed1" / "summary.json").unlink()
    scripts.load("sweep").main(argv)
    assert (out / "index.jsonl").read_text() == before
    # the same cell directories asked for by a sweep of another config (as after a change of a
    # default): refused before any run, naming the field, nothing overwritten
    started.clear()
    base = tuple(a if a != "2" else "3" for a in argv[argv.index("--") + 1:])
    cells = sweep.sweep_cells(sweep.SweepConfig(script="dpo", grid=("beta=0.1,0.5",), base=base))
    with pytest.raises(ConfigError, match=r"cell 'beta=0.1' seed 0: .*differing: config\.steps\)"):
        sweep.run_cells(cells, [0, 1], out)
    assert started == [] and (out / "index.jsonl").read_text() == before
    table = (out / "results.md").read_text()
    assert "| beta=0.1 | 2 |" in table and "| beta=0.5 | 2 |" in table
    # the same directory with other seeds (then the original ones again): finished cells are
    # reused, nothing reruns, and the index lists the cells and seeds of the latest command
    i = argv.index("--seeds")
    scripts.load("sweep").main([*argv[:i + 1], "1", *argv[i + 3:]])
    assert started == [] and [json.loads(r)["seed"] for r in
                              (out / "index.jsonl").read_text().splitlines()] == [1, 1]
    scripts.load("sweep").main(argv)
    assert started == [] and (out / "index.jsonl").read_text() == before
    # the reader, from another working directory: the index as arrays / a DataFrame, each run
    monkeypatch.chdir(out)
    sw = load_sweep(".")
    cols = sw.arrays()
    assert list(cols["override/beta"]) == [0.1, 0.1, 0.5, 0.5]
    assert list(cols["seed"]) == [0, 1, 0, 1]
    assert sw.run("beta=0.5", 1).summary["gold/dpo"] == index[3]["gold/dpo"]
    assert len(sw.to_pandas()) == 4


def test_a_cell_record_from_before_a_config_field_was_added_is_the_same_config(tmp_path):
    """A run's ``sweep_cell.json`` lacking a field the config class gained since (at its
    default) is resumed, as ``RunDir.write_config`` resumes it; a changed value is refused."""
    cell = sweep.override_cells("dpo", [{"beta": 0.1}])[0]
    run_dir = tmp_path / cell.name / "seed0"
    run_dir.mkdir(parents=True)
    record = sweep._claim(cell, 0, run_dir)
    older = {**record, "config": {k: v for k, v in record["config"].items() if k != "steps"}}
    (run_dir / sweep.CELL_FILE).write_text(json.dumps(older))
    assert sweep._claim(cell, 0, run_dir) == record
    older["config"]["beta"] = 0.2
    (run_dir / sweep.CELL_FILE).write_text(json.dumps(older))
    with pytest.raises(ConfigError, match=r"differing: config\.beta\)"):
        sweep._claim(cell, 0, run_dir)
    (run_dir / sweep.CELL_FILE).write_text(json.dumps({**record, "script": "ppo"}))
    with pytest.raises(ConfigError, match=r"differing: script\)"):
        sweep._claim(cell, 0, run_dir)


def test_results_table_says_over_how_many_seeds_a_number_is():
    """A key some seeds lack, or a non-finite value (left out, not turned into nan ± nan), is
    a mean over fewer seeds than the cell ran: the cell says so; a full cell does not."""
    rows = [{"cell": "a", "seed": s, "gold": g, "kl": k}
            for s, g, k in ((0, 1.0, 1.0), (1, 2.0, float("nan")), (2, 3.0, 2.0))]
    rows.append({"cell": "b", "seed": 0, "gold": 0.5})
    table = sweep.results_table(rows).splitlines()
    assert table[2] == "| a | 3 | 2.000 ± 1.000 | 1.500 ± 0.707 (n=2) |"
    assert table[3] == "| b | 1 | 0.500 | — |"
