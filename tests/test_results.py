"""README's results tables are rendered from the committed files in results/; the run reader and
the optional TensorBoard / W&B mirrors round-trip what the runs write."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import log_writers, results, results_compare
from rlhf_jax.runs import RunDir, load, load_run

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_equal_the_committed_results():
    assert results.check_readme(ROOT / "README.md", ROOT / "results") == []


def test_collect_render_and_check_a_run_into_a_readme(tmp_path):
    from rlhf_jax import tiny

    run = tiny.tiny_run("ppo")
    (seed0,) = results.collect([run], tmp_path / "res" / "pipeline")
    assert seed0.name == "seed0"
    assert sum(f.stat().st_size for f in seed0.iterdir()) < 200_000
    sft = [json.loads(line) for line in (seed0 / "samples_sft.jsonl").read_text().splitlines()]
    assert len({r["uid"] for r in sft}) <= results.PROMPTS_KEPT
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    assert results.check_readme(readme, tmp_path / "res")   # runs there, no block yet
    assert results.update_readme(readme, tmp_path / "res") == ["pipeline"]
    assert results.check_readme(readme, tmp_path / "res") == []
    block = results.blocks(readme.read_text())["pipeline"]
    s = json.loads((run / "summary.json").read_text())
    assert f"| SFT | {s['gold/sft']:.3f}".replace("-", "−") in block
    assert f"{s['kl/rlhf_vs_sft']:.3f} |" in block
    # one number changed in the README is caught
    text = readme.read_text().replace(f"{s['kl/rlhf_vs_sft']:.3f} |", "9.999 |")
    readme.write_text(text)
    assert results.check_readme(readme, tmp_path / "res")


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _block(rendered: str, name: str) -> str:
    return f"<!-- results:{name}:start -->\n{rendered}<!-- results:{name}:end -->\n"


def test_every_committed_set_is_checked_number_by_number(tmp_path):
    """Each committed set's README block is compared with its files: one changed digit in any
    block is a problem naming that set, and a block naming no set is one too."""
    text = (ROOT / "README.md").read_text()
    found = results.blocks(text)
    committed = [n for n in results.SETS if results.present(ROOT / "results" / n)]
    assert {"pipeline", "entropy", "bf16", "compare", "reward", "dpo_beta", "sentiment_rm",
            "sentiment_ppo"} <= set(committed) <= set(found)
    for name in committed:
        block = found[name]     # a digit of the first table row under the header
        i = next(i for i, ch in enumerate(block) if ch.isdigit() and i > block.index("|---"))
        bad = block[:i] + str((int(block[i]) + 1) % 10) + block[i + 1:]
        (tmp_path / "R.md").write_text(text.replace(block, bad))
        problems = results.check_readme(tmp_path / "R.md", ROOT / "results")
        assert len(problems) == 1 and f"`{name}`" in problems[0]
    (tmp_path / "R.md").write_text(text + _block("x\n", "nosuchset"))
    assert "nosuchset" in results.check_readme(tmp_path / "R.md", ROOT / "results")[0]


def test_reward_table_against_a_loop_over_the_committed_files():
    """Every seed's cells of the reward block, the mean ± std column, the weakest pair kind and
    the SFT line, recomputed with plain loops from results/reward/seed*/."""
    block = results.blocks((ROOT / "README.md").read_text())["reward"]
    runs = [json.loads((ROOT / "results" / "reward" / f"seed{s}" / "summary.json").read_text())
            for s in (0, 1, 2)]
    pairs = ["correct_vs_fabricated", "correct_vs_unknown", "unknown_vs_fabricated",
             "fabricated_vs_malformed", "correct_vs_malformed", "unknown_vs_malformed"]
    for p in pairs:
        v = [r[f"rm/gold_agreement/{p}"] for r in runs]
        m = sum(v) / 3
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / 2)
        assert (f"| {p.replace('_vs_', ' vs ')} | " + " | ".join(
            f"{x:.3f} ({r[f'rm/pairs/{p}']:,})" for x, r in zip(v, runs))
            + f" | {m:.3f} ± {sd:.3f} |") in block
    for key in ("rm/spearman", "rm/accuracy", "rm/noise_ceiling", "rm/gold_label_accuracy"):
        assert f"`{key}` " in block and " | ".join(f"{r[key]:.3f}" for r in runs) in block
    worst = min((r[f"rm/gold_agreement/{p}"], s, p) for s, r in enumerate(runs) for p in pairs)
    assert (f"Weakest pair kind: {worst[2].replace('_vs_', ' vs ')}, seed {worst[1]}: "
            f"{worst[0]:.3f} on {runs[worst[1]][f'rm/pairs/{worst[2]}']} pairs.") in block
    sft = [json.loads((ROOT / "results" / "reward" / f"seed{s}" / "sft_summary.json")
                      .read_text()) for s in (0, 1, 2)]
    assert " / ".join(f"{x['knowledge/sft']:.3f}" for x in sft) + " after SFT" in block


def test_reward_table_without_pair_kinds_keeps_the_gap_line_out_of_the_table(tmp_path):
    """With no answer-kind pair reported (fewer than min_pairs of each), the accuracy-gap
    sentence is a paragraph of its own, not text glued onto the table's last row."""
    from rlhf_jax.results_stages import reward_table

    for s in (0, 1):
        (tmp_path / f"seed{s}").mkdir()
        (tmp_path / f"seed{s}" / "summary.json").write_text(json.dumps({
            "rm/gold_agreement": 0.9, "rm/gold_pairs": 100, "rm/accuracy": 0.7,
            "rm/noise_ceiling": 0.75, "rm/gold_label_accuracy": 0.78}))
    text = reward_table(tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") and "points, seed" not in line for line in rows)
    gap = "`rm/gold_label_accuracy` − `rm/accuracy` (points, seed 0 / 1): 8.0 / 8.0."
    assert f"\n\n{gap}\n" in text


def test_reward_collect_from_a_pipeline_directory(tmp_path):
    run = tmp_path / "pipe"
    summary = {"rm/gold_agreement": 0.9, "rm/gold_agreement/correct_vs_unknown": 0.5,
               "rm/gold_agreement/new_vs_old": 0.25, "rm/pairs/new_vs_old": 4,
               "rm/accuracy": 0.7, "rm/gold_label_accuracy": 0.75}
    _write(run / "reward" / "summary.json", summary)
    _write(run / "reward" / "config.json", {"steps": 400})
    _write(run / "reward" / "meta.json", {"seed": 7})
    _write(run / "sft" / "summary.json", {"knowledge/base": 0.5, "knowledge/sft": 0.625,
                                           "fabrication_rate/sft": 0.25,
                                           "demonstrator/fabrication_rate": 0.125})
    _write(run / "summary.json", {"gold/rlhf": 1.0})       # the pipeline's own: not this set's
    (d,) = results.collect([run], tmp_path / "res" / "reward")
    assert d.name == "seed7" and json.loads((d / "summary.json").read_text()) == summary
    table = results.SETS["reward"].render(d.parent)
    # known pair kinds first, others after; pair counts only where every seed has them
    assert table.index("| correct vs unknown | 0.500 | 0.500 |") < table.index(
        "| new vs old | 0.250 (4) | 0.250 |")
    assert "| `rm/accuracy` (vs the noisy labels) | 0.700 | 0.700 |" in table
    assert "Weakest pair kind: new vs old, seed 7: 0.250 on 4 pairs." in table
    assert "(points, seed 7): 5.0." in table and "`rm/spearman`" not in table
    assert ("probe 0.500 after pretraining, 0.625 after SFT; fabrication rate 0.250 against "
            "the demonstrator's 0.125.") in table


def _fake_sweep(out: Path, betas=(0.5, 0.3), seeds=(0, 1)) -> Path:
    """A sweep.py run directory over DPO's β: index.jsonl and <cell>/seed<S>/ run files."""
    rows = []
    for beta in betas:
        for seed in seeds:
            d = out / f"beta={beta}" / f"seed{seed}"
            s = {"gold/dpo": beta + 0.1 * seed, "fabrication_rate/dpo": 0.05,
                 "accuracy/dpo": 0.8, "malformed_rate/dpo": 0.1 * seed,
                 "win_rate/dpo_vs_sft": 0.7, "kl/dpo_vs_sft": 2 * beta, "win_rate/ceiling": 0.77,
                 "gold/sft": -0.1, "fabrication_rate/sft": 0.4, "accuracy/sft": 0.6,
                 "malformed_rate/sft": 0.04}
            _write(d / "summary.json", s)
            _write(d / "config.json", {"loss": "dpo", "beta": beta, "steps": 400,
                                       "batch_prompts": 16, "optim": {"learning_rate": 5e-5}})
            _write(d / "meta.json", {"seed": seed})
            (d / "params").mkdir()                       # not collected
            rows.append({"cell": f"beta={beta}", "seed": seed})
    (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("config.json", "meta.json"):
        _write(out / name, {})
    (out / "results.md").write_text("| table |\n")
    return out


def test_dpo_beta_collect_and_render_by_hand(tmp_path):
    run = _fake_sweep(tmp_path / "sweep")
    dest, *cells = results.collect([run], tmp_path / "res" / "dpo_beta")
    assert len(cells) == 4 and not (dest / "beta=0.3" / "seed0" / "params").exists()
    table = results.SETS["dpo_beta"].render(dest)
    assert "Seeds 0, 1 of one `sweep.py --script dpo` run (400 steps of 16 prompts, lr 5e-5;" \
        in table
    assert "| β | gold | fabrication | accuracy | malformed | win rate vs SFT (ceiling 0.770) " \
        "| KL to SFT (nats/seq) |" in table
    assert "| SFT | −0.100 | 0.400 | 0.600 | 0.040 | — | 0 |" in table
    # rows by β, the default marked; mean ± std over the cell's seeds
    assert table.index("| 0.3 (default) | 0.350 ± 0.071 | 0.050 ± 0.000 | 0.800 ± 0.000 | "
                       "0.050 ± 0.071 | 0.700 ± 0.000 | 0.600 ± 0.000 |") < table.index("| 0.5 |")
    summary = json.loads((dest / "beta=0.5" / "seed1" / "summary.json").read_text())
    _write(dest / "beta=0.5" / "seed1" / "summary.json", {**summary, "gold/sft": 0.0})
    with pytest.raises(ValueError, match="2 SFT models"):
        results.SETS["dpo_beta"].render(dest)
    with pytest.raises(ValueError, match="one sweep run"):
        results.collect([run, run], tmp_path / "res2" / "dpo_beta")


def test_dpo_beta_rows_from_the_committed_files_and_beta_0_3_is_compares_dpo_seed_0():
    """Each β row recomputed from its committed summary; the default-β cell ran the compare set's
    DPO seed-0 config from the same reward run, so its summary equals that one but for times."""
    block = results.blocks((ROOT / "README.md").read_text())["dpo_beta"]
    res = ROOT / "results" / "dpo_beta"
    for beta in ("0.1", "0.2", "0.3", "0.5"):
        s = json.loads((res / f"beta={beta}" / "seed0" / "summary.json").read_text())
        want = [s[k] for k in ("gold/dpo", "fabrication_rate/dpo", "accuracy/dpo",
                               "malformed_rate/dpo", "win_rate/dpo_vs_sft", "kl/dpo_vs_sft")]
        row = next(x for x in block.splitlines() if x.startswith(f"| {beta}"))
        assert row.endswith(" | ".join(f"{v:.3f}" for v in want) + " |")
    same = json.loads((res / "beta=0.3" / "seed0" / "summary.json").read_text())
    dpo = json.loads((ROOT / "results" / "compare" / "dpo" / "seed0" / "summary.json").read_text())
    assert {k: v for k, v in same.items() if not k.startswith("time_s/offline")} == \
        {k: v for k, v in dpo.items() if not k.startswith("time_s/offline")}


def test_sentiment_exploration_rows_against_a_loop_over_the_committed_files():
    """One row of each sentiment exploration table recomputed by hand from its committed files:
    the 200-step last-token RM and the PPO run adaptive to 2.5 nats with horizon 500."""
    found = results.blocks((ROOT / "README.md").read_text())
    d = ROOT / "results" / "sentiment_rm" / "s4-sent-rm-last-200"
    s, c = (json.loads((d / f).read_text()) for f in ("summary.json", "config.json"))
    assert (c["readout"], c["steps"], c["optim"]["learning_rate"]) == ("last", 200, 5e-4)
    assert (f"| last-token head | 200 | 5e-4 | {s['rm/gold_agreement']:.3f} | "
            f"{s['rm/gold_agreement/positive_vs_negative']:.3f} | `s4-sent-rm-last-200` |"
            ) in found["sentiment_rm"].splitlines()
    rows = [json.loads(p.read_text()) for p in (ROOT / "results" / "sentiment_rm").rglob(
        "summary.json")]
    assert len(rows) == 6 and f"**{max(r['rm/gold_agreement'] for r in rows):.3f}**" in \
        found["sentiment_rm"]
    d = ROOT / "results" / "sentiment_ppo" / "s4-sent-ppo-t2.5h500"
    s, c = (json.loads((d / f).read_text()) for f in ("summary.json", "config.json"))
    h = c["ppo"]
    kl = f"{s['kl/rlhf_vs_sft']:.2f}"
    kl = f"**{kl}**" if s["kl/rlhf_vs_sft"] <= s["kl/budget"] else kl
    row = (f"| β {h['kl_coef']} (final {s['final/kl/coef']:.3f}), adaptive to {h['kl_target']}, "
           f"horizon {int(h['kl_horizon'])} | {s['gold/sft']:.3f} → {s['gold/rlhf']:.3f} | "
           f"{s['positive_rate/sft']:.3f} → {s['positive_rate/rlhf']:.3f} | "
           f"{s['win_rate/rlhf_vs_sft']:.3f} | {kl} | "
           f"{s['distinct_2/sft']:.3f} / {s['distinct_2/rlhf']:.3f} | "
           f"{s['rm/gold_agreement_on_policy']:.3f} | `s4-sent-ppo-t2.5h500` |")
    assert row in found["sentiment_ppo"].splitlines()
    # a fixed β and a penalty on responses without EOS are named in the label
    c = json.loads((ROOT / "results" / "sentiment_ppo_all" / "s0-b1.0-eos1" / "config.json"
                    ).read_text())
    assert (c["ppo"]["adaptive_kl"], c["ppo"]["kl_coef"], c["ppo"]["no_eos_penalty"]) == (
        False, 1.0, 1.0)
    assert any(r.startswith("| β 1 (fixed), 1 off a response without EOS, stop at KL 2.5: ") and
               r.endswith("| `s0-b1.0-eos1` |") for r in found["sentiment_ppo_all"].splitlines())
    # RAFT's row names its group, batch and ranking instead of a KL controller
    c = json.loads((ROOT / "results" / "sentiment_ppo_all" / "s0-raft-b0.5" / "config.json"
                    ).read_text())
    assert (c["ppo"]["advantage"], c["ppo"]["group_size"], c["ppo"]["kl_coef"]) == ("best", 16, 0.5)
    assert any(r.startswith("| RAFT: SFT on the RM's best of 16 samples per prompt (the "
                            "policy's), 32 prompts × 2 epochs × 2 minibatches per iteration, "
                            "ranked by score − 0.5·KL, policy lr 1e-4, ")
               and r.endswith("| `s0-raft-b0.5` |")
               for r in found["sentiment_ppo_all"].splitlines())
    # online DPO's rows name its β, its pair, whose samples and its batch
    c = json.loads((ROOT / "results" / "sentiment_ppo_all" / "s0-odpo-ref-lr1e-4" / "config.json"
                    ).read_text())
    assert (c["ppo"]["advantage"], c["ppo"]["sample_from"], c["ppo"]["minibatches"]) == (
        "pair", "reference", 2)
    assert any(r.startswith("| online DPO (β 0.1): the RM's best vs worst of 4 samples per "
                            "prompt (the start's), 32 prompts × 1 epoch × 2 minibatches per "
                            "iteration, ranked by the RM score alone, policy lr 1e-4, ")
               and r.endswith("| `s0-odpo-ref-lr1e-4` |")
               for r in found["sentiment_ppo_all"].splitlines())


def test_sentiment_exploration_collect_names_stages_and_refuses_mixed_data(tmp_path):
    """A pipeline's reward stage is stored under the pipeline's name (read through a symlink);
    a PPO run's config comes from its ppo/ stage; runs on different data are refused."""
    base = tmp_path / "base" / "reward"
    from rlhf_jax.results_sentiment import RM_CHOSEN

    steps = RM_CHOSEN[1]
    _write(base / "summary.json", {"preferences/train_prompts": 8, "rm/gold_pairs": 10,
                                   "rm/noise_ceiling": 0.8, "rm/gold_agreement": 0.6,
                                   "rm/gold_agreement/positive_vs_negative": 0.7})
    _write(base / "config.json", {"labeler": {"k": 4}, "steps": steps, "freeze_trunk": False,
                                  "lm_readout": False, "optim": {"learning_rate": 5e-4}})
    _write(base / "meta.json", {"seed": 0})
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "reward").symlink_to(base)
    other = tmp_path / "rm-sum"
    shutil.copytree(base, other)
    _write(other / "config.json", {**json.loads((base / "config.json").read_text()),
                                   "readout": "sum", "optim": {"learning_rate": 1.5e-4}})
    dest = tmp_path / "res" / "sentiment_rm"
    assert [p.relative_to(dest).as_posix() for p in results.collect(
        [tmp_path / "pipe" / "reward", other], dest)] == ["pipe/reward", "rm-sum"]
    table = results.SETS["sentiment_rm"].render(dest)
    assert "Seed 0 in every row, the same 8 × 4 labelled samples" in table
    assert f"| **last-token head** (`readout last`, chosen) | {steps} | 5e-4 | **0.600** | 0.700 " \
        "| `pipe/reward` |" in table
    assert f"| per-token head, sum over response tokens (`readout sum`) | {steps} | 1.5e-4 | " \
        "**0.600** | 0.700 | `rm-sum` |" in table
    _write(dest / "rm-sum" / "meta.json", {"seed": 1})
    with pytest.raises(ValueError, match="differ in seed"):
        results.SETS["sentiment_rm"].render(dest)


def _sentiment_summary(seed: int, gold_rlhf: float) -> dict:
    s = {f"{k}/{p}": 0.1 * (seed + 1) for k in ("gold", "positive_rate", "negative_rate",
                                              "distinct_1", "distinct_2") for p in ("sft", "rlhf")}
    return {**s, "gold/rlhf": gold_rlhf, "gold/best_of_n": 0.3, "positive_rate/best_of_n": 0.4,
            "kl/best_of_n": 0.193, "kl/rlhf_vs_sft": 2.0 + seed, "kl/budget": 3.0,
            "perplexity/sft_under_sft": 200.0 + 10 * seed,
            "perplexity/rlhf_under_sft": 250.0 if seed == 0 else None,   # a NaN, as JSON writes it
            "wins/rlhf_vs_sft": 400 + seed, "ties/rlhf_vs_sft": 300,
            "losses/rlhf_vs_sft": 324 - seed,
            "win_rate/rlhf_vs_sft": 0.5 + 0.1 * seed, "win_rate/best_of_n_vs_sft": 0.55,
            "bar/win_rate": seed == 1, "bar/kl": seed == 0, "bar/distinct_2": True,
            "rm/gold_agreement": 0.6, "rm/noise_ceiling": 0.8,
            "rm/gold_agreement_on_policy": 0.5 + 0.2 * seed}


def test_sentiment_table_is_mean_and_std_over_seeds_and_skipped_until_it_exists(tmp_path):
    res = tmp_path / "res"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + _block("typed by hand\n", "sentiment"))
    assert results.check_readme(readme, res) == []          # no results/sentiment yet: skipped
    assert results.update_readme(readme, res) == []
    for seed, gold in ((0, 0.1), (1, 0.2)):
        _write(res / "sentiment" / f"seed{seed}" / "summary.json", _sentiment_summary(seed, gold))
        _write(res / "sentiment" / f"seed{seed}" / "config.json", {"best_of_n": 4})
    assert "sentiment" in results.check_readme(readme, res)[0]   # files now exist: must agree
    assert results.update_readme(readme, res) == ["sentiment"]
    assert results.check_readme(readme, res) == []
    block = results.blocks(readme.read_text())["sentiment"]
    sd = np.std([0.1, 0.2], ddof=1)                         # 0.0707
    assert f"| **RLHF (PPO)** | **0.150 ± {sd:.3f}** | 0.150 ± {sd:.3f} | 0.150 ± {sd:.3f} | " \
           f"**2.500 ± {sd * 10:.3f}** | 0.150 ± {sd:.3f} | 0.150 ± {sd:.3f} | — |" \
           in block
    assert "| start (pretrained, `sft`) | 0.150 ± 0.071 | 0.150 ± 0.071 | 0.150 ± 0.071 | 0 | " \
           "0.150 ± 0.071 | 0.150 ± 0.071 | 205.0 ± 7.1 |" in block
    # the analytic KL of best-of-n, equal on every seed: the value alone
    assert "| best-of-4 (RM reranks start's samples) | 0.300 ± 0.000 | 0.400 ± 0.000 | — | " \
           "0.193 (analytic) | — | — | — |" in block
    assert "(1,024 pairs per seed): wins / ties / losses (mean) 400 / 300 / 324" in block
    assert "on the RLHF policy's held-out samples 0.600 ± 0.141." in block
    assert "win rate 0.550 ± 0.071** (bar 0.60: met in 1 of 2 seeds)" in block
    assert "budget of 3 nats/seq in 1 of 2" in block
    assert ("Per seed (win rate / exact KL / distinct-2 as a share of the start's): seed 0 "
            "0.500 / 2.00 / 1.00; seed 1 0.600 / 3.00 / 1.00.") in block


def test_entropy_and_bf16_tables_against_a_loop_over_the_committed_files():
    """Independent re-computation (plain loops) of every number of one entropy row and one bf16
    row from the committed files, against the rendered README blocks."""
    found = results.blocks((ROOT / "README.md").read_text())
    cell = ROOT / "results" / "entropy" / "target0.15"
    ent, coef, late_max, late_min = [], [], [], []
    gold = []
    for seed in (0, 1, 2):
        text = (cell / f"seed{seed}" / "metrics.jsonl").read_text()
        rows = [json.loads(x) for x in text.splitlines()]
        assert len(rows) == 40
        ent.append(sum(r["rollout/entropy"] for r in rows[30:]) / 10)
        coef.append(sum(r["entropy/coef"] for r in rows[30:]) / 10)
        late_max.append(max(r["rollout/entropy"] for r in rows[10:]))
        late_min.append(min(r["rollout/rm_score"] for r in rows[10:]))
        gold.append(json.loads((cell / f"seed{seed}" / "summary.json").read_text())["gold/rlhf"])

    def ms(v):
        m = sum(v) / len(v)
        return f"{m:.3f} ± {math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)):.3f}"

    row = next(x for x in found["entropy"].splitlines() if x.startswith("| 0.15 |"))
    assert row.startswith(f"| 0.15 | {ms(ent)} | {ms(coef)} | {ms(gold)} |")
    assert row.endswith(f"| {min(late_max):.2f} to {max(late_max):.2f} | "
                        f"{min(late_min):.2f} to {max(late_min):.2f} |".replace("-", "−"))
    s = json.loads((ROOT / "results" / "bf16" / "bf16" / "seed1" / "summary.json").read_text())
    row = next(x for x in found["bf16"].splitlines() if x.startswith("| bf16 | 1 |"))
    want = "{:.1e} / {:.1e}".format(s["final/rollout/logprob_mean_diff"],
                                     s["max/rollout/logprob_mean_diff"]).replace("e-0", "e-")
    assert row.endswith(f"| {want} |") and f"| {s['gold/rlhf']:.3f} |" in row


def test_sci_and_bf16_mean_line_by_hand(tmp_path):
    from rlhf_jax import results_tables as rt

    assert rt.sci(1.14e-6) == "1.1e-6" and rt.sci(0.0424) == "4.2e-2" and rt.sci(3.0) == "3.0e0"
    keys = ("gold/sft", "win_rate/rlhf_vs_sft", "fabrication_rate/rlhf", "accuracy/rlhf",
            "kl/rlhf_vs_sft", "final/rollout/logprob_max_diff", "max/rollout/logprob_max_diff",
            "final/rollout/logprob_mean_diff", "max/rollout/logprob_mean_diff")
    for prec, golds in (("float32", (0.70, 0.72)), ("bf16", (0.71, 0.75))):
        for seed, g in enumerate(golds):
            _write(tmp_path / prec / f"seed{seed}" / "summary.json",
                   {**dict.fromkeys(keys, 1e-3), "gold/rlhf": g})
    table = rt.bf16_table(tmp_path)
    assert table.index("| float32 | 0 |") < table.index("| float32 | 1 |") < table.index("| bf16 |")
    # pooled std: sqrt((0.0002 + 0.0008) / 2) = 0.02236; 2 * 0.02236 / sqrt(2) = 0.0316
    assert ("float32 0.710, bf16 0.730; |Δ| = 0.020 against 2 × pooled std / √2 = 0.032 "
            "(pooled std 0.022)") in table


def _fake_compare(out: Path) -> Path:
    """A compare run directory as experiments/compare.py writes it: two methods × two seeds."""
    sft = {"gold": -0.1, "fabrication_rate": 0.4, "accuracy": 0.6, "unknown_rate": 0.2}

    def run(method, seed, kl, curve, start="sft"):
        base = {"gold": 0.5 + 0.1 * seed, "fabrication_rate": 0.05, "accuracy": 0.8 + 0.1 * seed,
                "win_rate": 0.7, "wins": 10, "ties": 5, "losses": 1, "time_s": 100.0 + seed,
                "budget": "b", "seed": seed, "method": method, "start": start, "sft": sft,
                "win_rate_ceiling": 0.77, "kl": kl, "curve": curve, "unknown_rate": 0.4}
        d = out / method / f"seed{seed}"
        _write(d / "summary.json", {"gold/rlhf": base["gold"]})
        online = {"ppo": {"kl_coef": 0.0, "clip_eps": 3e-4, "clip_eps_high": 4e-4}}
        offline = {"loss": "dpo", "beta": 0.3, "optim": {"learning_rate": 5e-5}}
        _write(d / "config.json", online if method != "dpo" else offline)
        (d / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": i, "rollout/entropy": 0.2, "train/clip_frac": 0.5, "x": 1}) + "\n"
            for i in (1, 2)) if method != "dpo" else json.dumps({"step": 1, "dpo/loss": 1}) + "\n")
        return base

    runs = {"gspo": [run("gspo", s, 0.4, [[0, -0.1, 0.4], [0.4, 0.5, 0.1]]) for s in (0, 1)],
            "dpo": [run("dpo", s, 1.0, [[0, -0.1, 0.4], [0.2, 0.1, 0.3], [1.0, 0.5, 0.1]])
                    for s in (0, 1)]}
    _write(out / "results.json", {"methods": ["gspo", "dpo"], "matched_kl": 0.4, "runs": runs})
    _write(out / "config.json", {"matched_kl": 0.0, "eval_points": 3})
    for name in ("summary.json", "meta.json"):
        _write(out / name, {})
    (out / "results.md").write_text("| table |\n")
    return out


def test_compare_collect_and_render_by_hand(tmp_path):
    run = _fake_compare(tmp_path / "run")
    (dest,) = results.collect([run], tmp_path / "res" / "compare")
    assert (dest / "gspo" / "seed1" / "metrics.jsonl").read_text().splitlines()[0] == json.dumps(
        {"step": 1, "rollout/entropy": 0.2, "train/clip_frac": 0.5})      # the excerpt's keys
    assert not (dest / "dpo" / "seed0" / "metrics.jsonl").exists()       # offline: no excerpt
    table = results.compare_table(dest)
    # method order of results.json; the label's hyperparameters from the seed-0 config
    assert table.index("| GSPO (ε 3e-4 / 4e-4) |") < table.index("| DPO (β 0.3) |")
    assert "| SFT | −0.100 | 0.400 | 0.600 | — | 0 | — | — |" in table
    # best of a column in bold (equal rounded means both bold); W / T / L and time: means
    assert ("| GSPO (ε 3e-4 / 4e-4) | **0.550 ± 0.071** | **0.050 ± 0.000** "
            "| **0.850 ± 0.071** | **0.700 ± 0.000** | 0.400 ± 0.000 | 10 / 5 / 1 | 100 |"
            ) in table
    assert "over 16 paired held-out samples" in table and "the 2 intermediate" in table
    assert "0.400 nats/seq, the smallest final KL of any run that starts from SFT (GSPO" in table
    # DPO crosses KL 0.4 between (0.2, 0.1, 0.3) and (1.0, 0.5, 0.1): a quarter of the way
    assert "| DPO (β 0.3) | 0.200 ± 0.000 | 0.250 ± 0.000 |" in table
    assert "| GSPO (ε 3e-4 / 4e-4) | **0.500 ± 0.000** | **0.100 ± 0.000** |" in table
    # the diagnostics: per seed, from the per-run files (offline runs: no training rollouts)
    assert ("| GSPO (ε 3e-4 / 4e-4) | — | 0.20 → 0.20 / 0.20 → 0.20 | 0.50 / 0.50 "
            "| 0.50 – 0.50 |") in table
    assert "| DPO (β 0.3) | — | — | — | — |" in table
    # DAPO's note: 2 seeds × 2 iterations, 16 prompts × 4 samples per iteration
    rows = [[{"rollout/fill_rate": f, "rollout/groups_with_spread": g, "rollout/length": 8.0,
              "rollout/overlong_penalty": p} for f, g, p in it] for it in
            ([(1.0, 0.5, 0.0), (0.5, 0.25, -0.25)], [(0.75, 0.5, 0.0), (0.0, 0.0, 0.0)])]
    note = results_compare._fill_note("DAPO", rows, {"ppo.keep_groups": 8,
                                                     "ppo.prompts_per_iter": 16,
                                                     "ppo.group_size": 4})
    assert ("mean over the iterations 0.75 / 0.38" in note and "no such group: 1 of 4" in note
            and "first 10 → last 10 iterations: 0.38 → 0.38 / 0.25 → 0.25" in note
            and "fired in 1 of 4 iterations, −16.0 in total over 256 samples; mean response "
            "length 8.0–8.0" in note)
    with pytest.raises(ValueError, match="one compare run"):
        results.collect([run, run], tmp_path / "res2" / "compare")


def test_run_reader_round_trips_what_a_run_writes(tmp_path):
    run = RunDir(tmp_path / "r")
    run.write_config({"seed": 3, "ppo": {"kl_coef": 0.05}})
    run.write_meta(seed=3)
    rows = [{"train/loss": 1.5, "kl/per_token": 0.1}, {"train/loss": math.nan},
            {"train/loss": 0.5, "kl/per_token": math.inf}]
    for i, r in enumerate(rows):
        run.log_metrics(i + 1, r)
    run.write_summary({"gold/rlhf": 0.25, "wins/rlhf_vs_sft": 7})
    run.write_jsonl("samples_sft.jsonl", [{"uid": "a", "sample": 0, "label": "correct"}])
    r = load_run(tmp_path / "r")
    assert r.config == {"seed": 3, "ppo": {"kl_coef": 0.05}} and r.meta["seed"] == 3
    assert r.summary == {"gold/rlhf": 0.25, "wins/rlhf_vs_sft": 7} and r.finished
    steps, loss = r.series("train/loss")
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_array_equal(loss, [1.5, np.nan, 0.5])
    cols = r.arrays()
    np.testing.assert_array_equal(cols["kl/per_token"], [0.1, np.nan, np.inf])
    assert r.sample_names() == ["sft"] and r.samples("sft")[0]["label"] == "correct"
    df = r.to_pandas()
    assert list(df["step"]) == [1, 2, 3] and df["train/loss"].iloc[2] == 0.5
    assert isinstance(load(tmp_path / "r"), type(r))
    with pytest.raises(FileNotFoundError, match="samples_rlhf"):
        r.samples("rlhf")


def test_tensorboard_and_wandb_mirror_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv(log_writers.ENV, "tensorboard,wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(tmp_path / "r")
    run.write_config({"seed": 0})
    for step in range(1, 4):
        run.log_metrics(step, {"train/loss": 1.0 / step, "note": "text", "bad": math.nan})
    log_writers.close()
    tb = log_writers.read_tensorboard(tmp_path / "r" / "tensorboard")
    assert set(tb) == {"train/loss"}
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in tb["train/loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
    (wb,) = (tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"train/loss" in wb.read_bytes() and b"0.5" in wb.read_bytes()
    # metrics.jsonl is unchanged by the mirrors; off by default
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    monkeypatch.delenv(log_writers.ENV)
    RunDir(tmp_path / "off").log_metrics(1, {"x": 1.0})
    assert not (tmp_path / "off" / "tensorboard").exists()
    monkeypatch.setenv(log_writers.ENV, "tensorbored")
    with pytest.raises(ValueError, match="tensorbored"):
        log_writers.enabled()


def _tensorboard_equals_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard mirror as read, after checking it holds each step of ``metrics.jsonl``
    once, with its values."""
    tb = log_writers.read_tensorboard(run / "tensorboard")
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    for tag, points in tb.items():
        want = [(r["step"], r[tag]) for r in rows if tag in r]
        assert [s for s, _ in points] == [s for s, _ in want], tag
        np.testing.assert_allclose([v for _, v in points], [v for _, v in want], rtol=1e-6)
    return tb


def test_tensorboard_mirror_of_a_resumed_run_shows_each_step_once_with_the_new_rows(
        tmp_path, monkeypatch):
    """A run killed after step 6 resumes from its step-4 checkpoint (``loop.truncate_metrics``,
    as ``loop.resume`` calls it) and logs steps 5.. again with other values: TensorBoard's purge
    marker hides the killed process's steps 5 and 6, so each step shows once, the resumed rows
    winning, as in metrics.jsonl. Also when the writer is still open (a resume in the same
    process) and when the new event file is opened within the same second as the last one
    (tensorboardX names files by the second: the new one must not overwrite it)."""
    from rlhf_jax.loop import truncate_metrics

    monkeypatch.setenv(log_writers.ENV, "tensorboard")
    run = RunDir(tmp_path / "r")
    truncate_metrics(run, 0)         # as loop.resume starts a new run
    for step in range(0, 7):
        run.log_metrics(step, {"loss": float(step), "acc": step / 10})
    log_writers.close()              # the killed process's events are on disk (a kill leaves no
    truncate_metrics(run, 4)         # more); the rerun resumes from the checkpoint at step 4
    for step in range(5, 9):
        run.log_metrics(step, {"loss": 10.0 * step, "acc": step / 100})
    truncate_metrics(run, 6)         # resumed again, its writer still open
    for step in range(7, 10):
        run.log_metrics(step, {"loss": 100.0 * step})
    log_writers.close()
    tb = _tensorboard_equals_metrics(tmp_path / "r")
    assert tb["loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0),
                          (6, 60.0), (7, 700.0), (8, 800.0), (9, 900.0)]
    assert [s for s, _ in tb["acc"]] == [0, 1, 2, 3, 4, 5, 6]
    assert len(list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))) == 3


def test_tensorboard_mirror_of_a_resumed_run_refills_the_rows_a_kill_left_unflushed(
        tmp_path, monkeypatch):
    """tensorboardX writes events to disk every few seconds: a kill loses the rows logged since,
    also rows up to the checkpoint that the rerun does not redo. The resumed process's writer
    replays them from metrics.jsonl (here steps 3 and 4 of the killed process reached
    metrics.jsonl only), so TensorBoard still holds every step once."""
    from rlhf_jax.loop import truncate_metrics

    monkeypatch.setenv(log_writers.ENV, "tensorboard")
    run = RunDir(tmp_path / "r")
    for step in range(1, 3):
        run.log_metrics(step, {"loss": float(step)})
    log_writers.close()
    monkeypatch.delenv(log_writers.ENV)    # rows 3..6: on disk in metrics.jsonl, not in
    for step in range(3, 7):               # the event file
        run.log_metrics(step, {"loss": float(step)})
    monkeypatch.setenv(log_writers.ENV, "tensorboard")
    truncate_metrics(run, 4)
    for step in range(5, 8):
        run.log_metrics(step, {"loss": 10.0 * step})
    log_writers.close()
    tb = _tensorboard_equals_metrics(tmp_path / "r")
    assert tb["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0),
                          (7, 70.0)]


@pytest.mark.parametrize("column, results_set, policy", [("RLHF", "sentiment", "rlhf"),
                                                         ("DPO", "sentiment_dpo", "dpo")])
def test_sentiment_sample_pairs_in_readme_are_seed_0s_committed_samples(column, results_set,
                                                                         policy):
    """The README's three sample pairs (start → RLHF, and start → DPO; same prompt and sample
    index) are rows of ``results/<set>/seed0/samples_{sft,<policy>}.jsonl``, texts and VADER
    compounds alike."""
    import re

    readme = (ROOT / "README.md").read_text()
    head = f"| prompt | sample | start | {column} |\n|---|---|---|---|\n"
    assert readme.count(head) == 1
    rows = readme.split(head)[1].split("\n\n")[0].splitlines()
    runs = ROOT / "results" / results_set / "seed0"
    load = {p: [json.loads(ln) for ln in (runs / f"samples_{p}.jsonl").read_text().splitlines()]
            for p in ("sft", policy)}
    load["rlhf"] = load[policy]
    assert len(rows) == 3
    for row in rows:
        _, k, start, rlhf = [c.strip() for c in row.strip("|").split(" | ")]
        cells = {}
        for name, cell in (("sft", start), ("rlhf", rlhf)):
            m = re.fullmatch(r"(.*) \(([+−]?[0-9.]+)\)", cell)
            assert m, cell
            cells[name] = (m.group(1), float(m.group(2).replace("−", "-")))
        text, score = cells["sft"]
        match = [r for r in load["sft"] if r["sample"] == int(k) and r["response"].strip() == text]
        assert len(match) == 1, row
        assert abs(match[0]["score"] - score) <= 5e-4 + 1e-9, row
        other = [r for r in load["rlhf"] if r["uid"] == match[0]["uid"] and r["sample"] == int(k)]
        assert len(other) == 1 and other[0]["response"].strip() == cells["rlhf"][0], row
        assert abs(other[0]["score"] - cells["rlhf"][1]) <= 5e-4 + 1e-9, row


def test_sentiment_dpo_table_names_the_method_and_has_no_best_of_n_row():
    """The sentiment table over default ``sentiment.py`` runs (DPO last): the policy row names DPO
    (from the committed stage configs), there is no best-of-N row or RM-on-policy figure (DPO
    evaluates none), and every seed's win rate and KL are its summary's."""
    d = ROOT / "results" / "sentiment_dpo"
    table = results.SETS["sentiment_dpo"].render(d)
    assert "| **RLHF (DPO)** |" in table and "best-of" not in table.lower()
    assert "agreement on the RLHF policy" not in table
    for seed in sorted(d.glob("seed*")):
        s = json.loads((seed / "summary.json").read_text())
        assert json.loads((seed / "config.json").read_text())["loss"] == "dpo"
        assert (f"{seed.name.replace('seed', 'seed ')} {s['win_rate/rlhf_vs_sft']:.3f} / "
                f"{s['kl/rlhf_vs_sft']:.2f} / ") in table
