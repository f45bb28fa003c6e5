"""Command-line parsing for experiment scripts: ``--out DIR`` plus every field of a stage config.

Fields of nested configs become dotted flags (``--optim.learning-rate 1e-3``); ``--help`` lists all
of them with their docstrings. Invalid values fail before any work, with a message naming the field.
Bad input found later (a checkpoint, its tokenizer, a preference row: errors naming the file, row
or field) ends the script the same way, with ``error: …`` and exit code 2; anything else is a bug
and shows its traceback.

``--init-from DIR`` (a Hugging Face checkpoint directory; an empty DIR is an error) sets the
``init_from`` field of the outermost stage config that has one, so every script starts its policy
from the checkpoint with the same flag (``sft.py``: the SFT stage; ``ppo.py``: the SFT stage it
runs first; ``pretrain.py``: continued pretraining).

``--quiet`` turns off the progress bars (terminal) or progress lines (log file), the stage
start/end lines and the resume line (:mod:`rlhf_jax.progress`).

Multi-host runs: ``--coordinator-address HOST:PORT --num-processes N --process-id I`` (or the
environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; or
``RLHF_JAX_DISTRIBUTED=auto`` on SLURM / Open MPI / Cloud TPU) connect the processes before any work.
"""



import contextlib
import dataclasses
import json
import sys
from typing import Annotated, Callable, Sequence, TypeVar

import tyro

from rlhf_jax.configs import ConfigError

C = TypeVar("C")
INIT_FROM_HELP = """
--log-to tensorboard,wandb: also write metrics to TensorBoard (<out>/tensorboard) and/or Weights &
Biases (<out>/wandb); metrics.jsonl is written either way (same as $RLHF_JAX_LOG_TO).
--init-from DIR: start the policy from a local Hugging Face checkpoint (config.json + safetensors
[+ tokenizer.json]) instead of a random initialisation; it sets the pretraining stage's
init_from; pretraining then continues on the task for its steps (--pretrain.steps, or
--steps in pretrain.py; 0 uses the checkpoint as it is).
"""


def parse(config_cls: type[C], argv: Sequence[str] | None = None, description: str | None = None,
          default: C | None = None) -> tuple[str, C]:
    """``(out, config)`` from the command line (``argv`` defaults to ``sys.argv[1:]``); flags
    override ``default`` (``config_cls()`` if None)."""

    argv = list(sys.argv[1:] if argv is None else argv)
    _log_to(_pop_option(argv, "--log-to"))
    init_from = _pop_option(argv, "--init-from")
    if init_from is not None:   # applied to the defaults, so the other flags validate against it
        with input_errors_exit():
            if not init_from.strip():
                raise ConfigError("--init-from: empty path (an unset variable?); give a "
                                  "checkpoint directory, or leave the flag out")
            default = with_init_from(config_cls() if default is None else default, init_from)

    @dataclasses.dataclass(frozen=True)
    class Args:
        out: str
        """run directory to write (a finished or interrupted run there is resumed)"""
        cfg: Annotated[config_cls, tyro.conf.arg(name="")] = dataclasses.field(  # type: ignore
            default_factory=config_cls if default is None else (lambda: default))
        coordinator_address: str = ""
        """multi-host: HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS, else one process)"""
        num_processes: int | None = None
        """multi-host: number of processes (default: $JAX_NUM_PROCESSES)"""
        process_id: int | None = None
        """multi-host: this process's index (default: $JAX_PROCESS_ID)"""
        quiet: bool = False
        """no progress bars or progress/stage/resume lines on stderr"""

    description = (description or "") + INIT_FROM_HELP
    with input_errors_exit():   # raised by a config's __post_init__ while parsing
        args = tyro.cli(Args, args=argv, description=description)
    from rlhf_jax import progress
    from rlhf_jax.parallel import initialize_distributed

    progress.set_quiet(args.quiet)

    initialize_distributed(args.coordinator_address or None, args.num_processes, args.process_id)
    return args.out, args.cfg


def input_errors() -> tuple[type[Exception], ...]:
    """The errors of bad input, each naming its file, row or field (imported when needed: the
    checkpoint's loads JAX)."""
    from rlhf_jax.data.preference_rows import PreferenceDataError
    from rlhf_jax.data.tokenizers import TokenizerError
    from rlhf_jax.models.hf_io import CheckpointError

    return ConfigError, CheckpointError, PreferenceDataError, TokenizerError


@contextlib.contextmanager
def input_errors_exit():
    """Bad input (:func:`input_errors`) raised in the block: ``error: …`` on stderr and exit
    code 2. Any other exception is a bug and keeps its traceback."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, input_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def _log_to(value: str | None) -> None:
    """``--log-to tensorboard,wandb``: mirror metrics (``rlhf_jax.log_writers``; via the env)."""
    if value:
        import os

        from rlhf_jax import log_writers

        os.environ[log_writers.ENV] = value
        try:
            log_writers.enabled()
        except ValueError as e:
            print(f"error: --log-to: {e}", file=sys.stderr)
            raise SystemExit(2) from e


def _pop_option(argv: list[str], flag: str) -> str | None:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from ``argv``; the value (None when absent)."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if a.startswith(flag + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def with_init_from(cfg: C, path: str) -> C:
    """``cfg`` with ``init_from = path`` in the outermost (breadth-first) nested config that has
    that field; a ``ConfigError`` when none has."""
    queue: list[tuple[tuple[str, ...], object]] = [((), cfg)]
    while queue:
        where, node = queue.pop(0)
        names = {f.name for f in dataclasses.fields(node)}
        if "init_from" in names:
            return _replace_at(cfg, where, init_from=path)
        queue += [((*where, f.name), getattr(node, f.name)) for f in dataclasses.fields(node)
                  if dataclasses.is_dataclass(getattr(node, f.name))]
    raise ConfigError(f"--init-from: {type(cfg).__name__} has no stage that starts from a policy")


def _replace_at(cfg, where: tuple[str, ...], **kw):
    if not where:
        return dataclasses.replace(cfg, **kw)
    return dataclasses.replace(cfg, **{where[0]: _replace_at(getattr(cfg, where[0]), where[1:],
                                                             **kw)})


def main(config_cls: type[C], runner: Callable[[C, str], dict], argv: Sequence[str] | None = None,
         description: str | None = None, default: C | None = None) -> dict:
    """Parse (flags override ``default``), run the stage, print its summary as JSON; returns the
    summary."""
    out, cfg = parse(config_cls, argv, description, default)
    from rlhf_jax import progress, scripts

    # e.g. a run directory that holds another config, a bad checkpoint or preference row
    from rlhf_jax.runs import run_locks

    with input_errors_exit(), run_locks():   # the run directories it claims (RunDir.lock)
        with progress.stage(scripts.name_of(runner), out):
            summary = runner(cfg, out)
    import jax

    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2, sort_keys=True))
    return summary
