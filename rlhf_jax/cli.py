"""Command-line parsing for experiment scripts: ``--out DIR`` plus every field of a stage config.

Fields of nested configs become dotted flags (``--optim.learning-rate 1e-3``); ``--help`` lists all
of them with their docstrings. Invalid values fail before any work, with a message naming the field.

Multi-host runs: ``--coordinator-address HOST:PORT --num-processes N --process-id I`` (or the
environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; or
``RLHF_JAX_DISTRIBUTED=auto`` on SLURM / Open MPI / Cloud TPU) connect the processes before any work.
"""



import dataclasses
import json
import sys
from typing import Annotated, Callable, Sequence, TypeVar

import tyro

from rlhf_jax.configs import ConfigError

C = TypeVar("C")


def parse(config_cls: type[C], argv: Sequence[str] | None = None, description: str | None = None,
          default: C | None = None) -> tuple[str, C]:
    """``(out, config)`` from the command line (``argv`` defaults to ``sys.argv[1:]``); flags
    override ``default`` (``config_cls()`` if None)."""

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

    try:
        args = tyro.cli(Args, args=argv, description=description)
    except ConfigError as e:  # raised by a config's __post_init__ while parsing
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    from rlhf_jax.parallel import initialize_distributed

    initialize_distributed(args.coordinator_address or None, args.num_processes, args.process_id)
    return args.out, args.cfg


def main(config_cls: type[C], runner: Callable[[C, str], dict], argv: Sequence[str] | None = None,
         description: str | None = None, default: C | None = None) -> dict:
    """Parse (flags override ``default``), run the stage, print its summary as JSON; returns the
    summary."""
    out, cfg = parse(config_cls, argv, description, default)
    try:
        summary = runner(cfg, out)
    except ConfigError as e:     # e.g. a run directory that holds another config
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    import jax

    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2, sort_keys=True))
    return summary
