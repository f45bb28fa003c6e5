"""What the experiment scripts compose, per stage: configs, loading a finished upstream run,
``loss_fn``s, data preparation and summaries.

The scripts in ``experiments/`` hold the composition itself (``run(cfg, out)``: models, loss or
compiled iteration, loop, evaluation, summary); drivers such as ``compare`` and ``sentiment`` run
the scripts in turn.
"""
