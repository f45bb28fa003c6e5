"""The task registry: which task a run trains on, built from its own config.

``TaskConfig`` is the ``task`` field of the pretraining config (the later stages read it from their
upstream run): the task's registry ``name`` (``--task.name``, default the embedded facts world), its
own settings, and the shapes the task is trained and evaluated at. :func:`build_task` is the one
place that turns a config into a :class:`rlhf_jax.data.task.Task`; the stages never name a concrete
task. A new task registers a builder (and, optionally, a frozen config dataclass filled from
``TaskConfig.options``)::

    register_task("coin", CoinTask, CoinConfig)   # then --pretrain.task.name coin
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, NamedTuple

from rlhf_jax.configs import check
from rlhf_jax.data.facts_world import FactsWorld, FactsWorldConfig
from rlhf_jax.data.sentiment import SentimentConfig, SentimentTask
from rlhf_jax.data.task import Task
from rlhf_jax.data.tokenizers import Tokenizer


class TaskEntry(NamedTuple):
    builder: Callable[..., Task]       # builder(config, tokenizer=None) -> Task
    config_cls: type | None            # frozen dataclass filled from TaskConfig.options


TASKS: dict[str, TaskEntry] = {}
DEFAULT_TASK = "facts_world"


def register_task(name: str, builder: Callable[..., Task], config_cls: type | None = None
                  ) -> None:
    """Make ``name`` selectable as ``TaskConfig(name=...)``: ``builder(config, tokenizer=None)``
    returns the task, ``config`` being ``config_cls`` built from ``TaskConfig.options`` (or the
    options dict itself without a ``config_cls``); ``tokenizer`` (None = the task's own) replaces
    the task's tokenizer, e.g. with an imported policy's."""
    TASKS[name] = TaskEntry(builder, config_cls)


register_task(DEFAULT_TASK, FactsWorld, FactsWorldConfig)
register_task("sentiment", SentimentTask, SentimentConfig)   # real text: fortunes, VADER judge


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The task and the shapes it is trained and evaluated at.

    Attributes:
      name: registered task (``rlhf_jax.tasks.TASKS``): ``facts_world`` (the embedded default),
        ``sentiment`` (positive continuations of Debian's fortunes) or one registered with
        ``register_task``.
      world: the facts world's settings (the generated world and its demonstrator); used when
        ``name`` is ``facts_world``.
      options: another task's settings, ``--task.options KEY VALUE …``: fields of the config class
        it registered, converted to their declared types.
      prompt_len: prompts are left-padded to this many tokens.
      max_new_tokens: response budget (sampling) and response length (SFT rows).
      eval_samples: samples per held-out prompt in evaluation (pinned protocol: T = 1, >= 4).
    """

    name: str = DEFAULT_TASK
    world: FactsWorldConfig = FactsWorldConfig()
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    prompt_len: int = 16
    max_new_tokens: int = 12
    eval_samples: int = 4

    def __post_init__(self):
        check(self.name in TASKS, "name",
              f"unknown task {self.name!r}; registered: {sorted(TASKS)}")
        check(self.name != DEFAULT_TASK or not self.options, "options",
              f"{DEFAULT_TASK} takes its settings from task.world, not options")
        check(self.prompt_len > 0, "prompt_len", "must be > 0")
        check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        check(self.eval_samples >= 4, "eval_samples", "the evaluation protocol needs >= 4")
        task_config(self)   # the task's own settings validate now, not at the first build


def task_config(cfg: TaskConfig) -> Any:
    """The registered task's own config: ``cfg.world`` for the facts world, else its config class
    filled from ``cfg.options`` (errors name ``task.options.<field>``)."""
    if cfg.name == DEFAULT_TASK:
        return cfg.world
    config_cls = TASKS[cfg.name].config_cls
    if config_cls is None:
        return dict(cfg.options)
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for key, value in cfg.options.items():
        check(key in fields, f"options.{key}",
              f"not a field of {config_cls.__name__} (fields: {sorted(fields)})")
        kwargs[key] = _convert(value, hints[key], f"options.{key}")
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as e:   # the task's own checks of its settings
        check(False, "options", f"{config_cls.__name__}: {e}")


def _convert(value: Any, hint: Any, field: str) -> Any:
    if hint is bool and isinstance(value, str):
        check(value.lower() in ("true", "false", "1", "0"), field, f"not a bool: {value!r}")
        return value.lower() in ("true", "1")
    if hint in (int, float, str):
        try:
            return hint(value)
        except ValueError:
            check(False, field, f"not a {hint.__name__}: {value!r}")
    return value


def build_task(cfg: TaskConfig, tokenizer: Tokenizer | None = None) -> Task:
    """The task ``cfg`` names, built from its own config; ``tokenizer`` (None = the task's own)
    replaces the task's tokenizer."""
    return TASKS[cfg.name].builder(task_config(cfg), tokenizer=tokenizer)
