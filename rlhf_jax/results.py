"""The README's results, from committed files: ``results/<set>/`` holds the summaries, configs and
small excerpts (trimmed samples, metrics columns) of the runs a README table reports, and the
table between ``<!-- results:<set>:start -->`` and ``<!-- results:<set>:end -->`` is rendered
from them (never typed by hand); ``tests/test_results.py`` checks they agree. One renderer and one
collector per set (``SETS``): ``pipeline``, ``sentiment``, ``entropy``, ``bf16``
(:mod:`rlhf_jax.results_tables`), ``compare`` (:mod:`rlhf_jax.results_compare`), ``reward`` and
``dpo_beta`` (:mod:`rlhf_jax.results_stages`), ``sentiment_rm`` and ``sentiment_ppo`` (the
sentiment task's exploration runs, :mod:`rlhf_jax.results_sentiment`); ``sentiment_all`` and
``sentiment_ppo_all`` render the same tables of the PPO runs labelled on every train prompt
(``sentiment.py --method ppo``), and ``sentiment_dpo`` the sentiment table of the default
``sentiment.py`` runs (DPO last; ``sentiment`` holds the task's first default, PPO on 2,048
labelled prompts). A set whose
``results/<set>/`` directory does not exist yet is skipped (its README block, if any, is left
as it is).

    python -m rlhf_jax.results collect /work/runs/s2-pipe-seed0 /work/runs/s2-pipe-seed1 \
        /work/runs/s2-pipe-seed2 --dest results/pipeline       # the set is the --dest's name
    python -m rlhf_jax.results collect runs/compare --dest results/compare
    python -m rlhf_jax.results collect /work/runs/s2-pipe-seed{0,1,2} --dest results/reward
    python -m rlhf_jax.results collect runs/dpo-beta --dest results/dpo_beta   # a sweep.py run
    python -m rlhf_jax.results collect /work/runs/s4-sent-seed0/reward \
        /work/runs/s4-sent-rm-last-200 --dest results/sentiment_rm   # sentiment_ppo: pipelines
    python -m rlhf_jax.results update-readme      # re-render every marked table in README.md
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from rlhf_jax.results_compare import collect_compare, compare_table
from rlhf_jax.results_sentiment import collect_explore, sentiment_ppo_table, sentiment_rm_table
from rlhf_jax.results_stages import collect_reward, collect_sweep, dpo_beta_table, reward_table
from rlhf_jax.results_tables import (PROMPTS_KEPT, ROOT, bf16_table, collect_entropy,  # noqa: F401
                                     collect_precision, collect_seeds, entropy_table,
                                     pipeline_table, sentiment_table)

RESULTS = ROOT / "results"


class TableSet(NamedTuple):
    render: Callable[[Path], str]                        # results/<set> -> the block's text
    collect: Callable[[Sequence[str | Path], Path], list[Path]]   # run dirs -> files copied


SETS = {
    "pipeline": TableSet(pipeline_table, collect_seeds),
    "compare": TableSet(compare_table, collect_compare),
    "entropy": TableSet(entropy_table, collect_entropy),
    "bf16": TableSet(bf16_table, collect_precision),
    "sentiment": TableSet(sentiment_table, collect_seeds),
    "reward": TableSet(reward_table, collect_reward),
    "dpo_beta": TableSet(dpo_beta_table, collect_sweep),
    "sentiment_rm": TableSet(sentiment_rm_table, collect_explore),
    "sentiment_ppo": TableSet(sentiment_ppo_table, collect_explore),
    # the same renderers over the PPO runs labelled on all 5,925 train prompts (``--method ppo``)
    "sentiment_all": TableSet(sentiment_table, collect_seeds),
    "sentiment_ppo_all": TableSet(sentiment_ppo_table, collect_explore),
    # the sentiment experiment's default: DPO in place of PPO, all train prompts
    "sentiment_dpo": TableSet(sentiment_table, collect_seeds),
}


def collect(run_dirs: Sequence[str | Path], dest: str | Path, name: str | None = None
            ) -> list[Path]:
    """Copy the runs' result files into ``dest`` with set ``name``'s collector (default: the
    set named like ``dest``)."""
    name = name or Path(dest).name
    if name not in SETS:
        raise ValueError(f"no results set {name!r} (sets: {', '.join(SETS)}); pass --set")
    return SETS[name].collect(list(run_dirs), Path(dest))


def present(results_dir: Path) -> bool:
    """A set's files exist (its directory holds anything)."""
    return results_dir.is_dir() and any(results_dir.iterdir())


BLOCK = re.compile(r"<!-- results:(\w+):start -->\n(.*?)<!-- results:\1:end -->", re.S)


def blocks(text: str) -> dict[str, str]:
    """The marked results blocks of a README: ``{set name: block text}``."""
    return {m.group(1): m.group(2) for m in BLOCK.finditer(text)}


def update_readme(readme: str | Path = ROOT / "README.md",
                  results_root: str | Path = RESULTS) -> list[str]:
    """Re-render every marked block whose results set has files; returns the sets rendered."""
    readme, root, done = Path(readme), Path(results_root), []
    text = readme.read_text()
    if "pipeline" not in blocks(text) and present(root / "pipeline"):
        text = _mark_main_table(text)
    for name in blocks(text):
        if name not in SETS:
            raise ValueError(f"{readme}: block `{name}` names no results set ({', '.join(SETS)})")
        if not present(root / name):
            continue
        table = SETS[name].render(root / name)
        text = BLOCK.sub(lambda m: m.group(0) if m.group(1) != name else
                         f"<!-- results:{name}:start -->\n{table}<!-- results:{name}:end -->",
                         text)
        done.append(name)
    readme.write_text(text)
    return done


def _mark_main_table(text: str, heading: str = "## Results on the embedded task") -> str:
    """Wrap the first table after ``heading`` (and its "RLHF vs SFT, paired" paragraph) in the
    pipeline block's markers, so it is rendered from then on."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    start = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    if end + 1 < len(lines) and lines[end + 1].startswith("RLHF vs SFT, paired"):
        end = next((i for i in range(end + 1, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join([*lines[:start], "<!-- results:pipeline:start -->",
                      "<!-- results:pipeline:end -->", *lines[end:]])


def check_readme(readme: str | Path = ROOT / "README.md",
                 results_root: str | Path = RESULTS) -> list[str]:
    """Problems: a marked block that names no set or differs from its files' rendering, or a
    committed results set no block shows. Empty when the README reports exactly the committed
    files; a set whose ``results/<set>/`` does not exist yet is skipped."""
    found, root, problems = blocks(Path(readme).read_text()), Path(results_root), []
    for name, text in found.items():
        if name not in SETS:
            problems.append(f"README block `{name}` names no results set ({', '.join(SETS)})")
        elif present(root / name) and text != SETS[name].render(root / name):
            problems.append(f"README block `{name}` differs from {root / name}: run "
                            "`python -m rlhf_jax.results update-readme`")
    for name in SETS:
        if present(root / name) and name not in found:
            problems.append(f"results/{name} has runs but README has no "
                            f"`<!-- results:{name}:start -->` block")
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rlhf_jax.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="copy runs' result files into results/<set>/")
    c.add_argument("runs", nargs="+")
    c.add_argument("--dest", default=str(RESULTS / "pipeline"))
    c.add_argument("--set", default=None, choices=sorted(SETS),
                   help="the results set (default: the name of --dest)")
    u = sub.add_parser("update-readme", help="re-render README's marked result tables")
    u.add_argument("--readme", default=str(ROOT / "README.md"))
    args = p.parse_args(argv)
    if args.cmd == "collect":
        for d in collect(args.runs, args.dest, args.set):
            print(d)
    else:
        print("rendered:", ", ".join(update_readme(args.readme)) or "no marked block")


if __name__ == "__main__":
    main()
