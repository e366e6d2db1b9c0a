"""What a stage is: one declaration per stage, and the registry that puts them in order.

A stage module in `etl/stages/` declares its stage once, on the function that runs it:

    @stage(reads=("doc_images",), writes=("images", "image_bytes"), config=("fetch", "redaction"))
    def fetch(ctx: StageContext) -> StageResult:
        ...  # read -> transform -> write -> record

The declaration names the tables it reads and writes, the config keys (sections or dotted paths)
and models its output depends on, and the steps that hold a GPU (`Step`: as NeMo Curator
decomposes a stage into execution stages that each carry their own `Resources`). Everything else comes from it: the runner's order and input check, the
`stage_config_hash`, the GPU profile, `realsyn stages`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from etl.context import StageContext, StageResult


@dataclass(frozen=True)
class Resources:
    """What one task of a step holds: a GPU or not. How much of one, and how many cores beside it,
    is the profile's (`spark.gpu.task_amount`, `task_cpus`: etl/gpu.py: gpu_profile), the same for
    every GPU step, so one ResourceProfile serves them all."""
    gpus: float = 0.0

    @property
    def gpu(self) -> bool:
        return self.gpus > 0


CPU = Resources()
GPU = Resources(gpus=1.0)


@dataclass(frozen=True)
class Step:
    """One execution step of a stage that holds resources of its own (NeMo Curator decomposes a
    stage into execution stages the same way). Only a declared step's map gets the GPU profile
    (`etl/gpu.py: map_in_pandas(..., step=name)`); every other map, join and write of the stage
    runs as ordinary tasks on every core."""
    name: str
    what: str  # one line for `realsyn stages`
    resources: Resources = GPU


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], StageResult]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    # Config keys the output depends on: a section ("fetch") or a dotted path ("fetch.max_bytes").
    config: tuple[str, ...]
    # Config keys whose values name an entry of `models:` ("embed.model" -> models.clip).
    models: tuple[str, ...] = ()
    # The steps that hold more than a CPU core (model forward passes, FAISS on a GPU).
    steps: tuple[Step, ...] = ()
    # Tables read when present (fallbacks, the stage's own earlier output); never required.
    optional_reads: tuple[str, ...] = ()

    @property
    def gpu_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.resources.gpu)

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"stage {self.name} declares no step {name!r} (declared: "
                       f"{', '.join(s.name for s in self.steps) or 'none'})")

    def __call__(self, ctx: StageContext) -> StageResult:
        """Run on `ctx` (as the runner does, without recording the run in `runs`)."""
        return self.run(ctx if ctx.stage is self else dataclasses.replace(ctx, stage=self))

    def model_keys(self, cfg: dict[str, Any]) -> list[str]:
        """The `models:` entries this stage uses under a (dumped) config."""
        return [k for k in (lookup(cfg, path) for path in self.models) if k is not None]

    def config_hash(self, cfg: dict[str, Any]) -> str:
        """Hash of exactly the config this stage's output depends on (a dumped Config): its keys,
        and the whole `models:` entry of every model it names."""
        parts = {path: lookup(cfg, path) for path in self.config + self.models}
        parts.update({f"models.{k}": cfg["models"][k] for k in self.model_keys(cfg) if k in cfg["models"]})
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage(*, reads: Iterable[str], writes: Iterable[str], config: Iterable[str], models: Iterable[str] = (),
          steps: Iterable[Step] = (), optional_reads: Iterable[str] = ()) -> Callable[[Callable], Stage]:
    """Declare the decorated function as a stage named after it."""
    def declare(fn: Callable) -> Stage:
        return Stage(name=fn.__name__, run=fn, reads=tuple(reads), writes=tuple(writes), config=tuple(config),
                     models=tuple(models), steps=tuple(steps), optional_reads=tuple(optional_reads))
    return declare


def lookup(cfg: dict[str, Any], path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"config has no key {path!r}")
        node = node[part]
    return node


class UnknownStage(ValueError):
    pass


class MissingInputs(ValueError):
    """A stage would read a table that no earlier stage writes and that does not exist yet."""


class Registry:
    """Stages in pipeline order."""

    def __init__(self, stages: Sequence[Stage]):
        self.stages = list(stages)
        self.by_name = {s.name: s for s in self.stages}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def __getitem__(self, name: str) -> Stage:
        if name not in self.by_name:
            raise UnknownStage(f"unknown stage {name!r}; stages are: {', '.join(self.names)}")
        return self.by_name[name]

    def resolve(self, requested: Iterable[str] | None) -> list[Stage]:
        """Requested stages in pipeline order (all of them when none are named)."""
        if not requested:
            return list(self.stages)
        wanted = {self[name.strip()].name for name in requested}
        return [s for s in self.stages if s.name in wanted]

    def check_inputs(self, selected: Sequence[Stage], exists: Callable[[str], bool]) -> None:
        """Refuse, before any work, a selection where a stage reads a table that neither an
        earlier selected stage writes nor already exists."""
        written: set[str] = set()
        missing = []
        for s in selected:
            for table in s.reads:
                if table not in written and not exists(table):
                    producers = [p.name for p in self.stages if table in p.writes]
                    missing.append(f"{s.name} reads {table}, which does not exist yet"
                                   + (f" (run {', '.join(producers)} first)" if producers else ""))
            written.update(s.writes)
        if missing:
            raise MissingInputs("; ".join(missing))
