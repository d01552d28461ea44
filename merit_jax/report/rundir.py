"""The run directory of ``merit run``: its layout, its config copy and its stage times.

See ``merit_jax.report.run`` for the layout. This module also turns a run
config's train, merge and eval sections into settings objects, raising
ConfigError that names the config file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from merit_jax.conflict.artifacts import write_atomic
from merit_jax.conflict.plan import PLAN_FILENAME
from merit_jax.report.report import REPORT_MARKDOWN
from merit_jax.report.settings import EvalSettings, MergeSettings, train_config_from_section
from merit_jax.runconfig import ConfigError, RunConfig, load_config
from merit_jax.train.config import TrainConfig

logger = logging.getLogger(__name__)

RUN_STATE_FILE = "run.json"
CONFIG_FILE = "config.yaml"
STAGES: tuple[str, ...] = (
    "load model",
    "plan",
    "branches",
    "merge",
    "joint",
    "eval",
    "report",
)
JOINT_MODEL = "joint"

# --------------------------------------------------------------------------- settings


def train_config_of(config: RunConfig) -> TrainConfig:
    """Return the run's TrainConfig (see ``merit_jax.report.settings``)."""
    try:
        return train_config_from_section(
            config.train, model=config.model, max_length=config.data.max_length, seed=config.seed
        )
    except ValueError as error:
        raise ConfigError(f"{config.source}: {error}") from None


def merge_settings_of(config: RunConfig) -> MergeSettings:
    """Return the run's merge settings, raising ConfigError that names the config file."""
    try:
        return MergeSettings.from_dict(config.merge)
    except ValueError as error:
        raise ConfigError(f"{config.source}: {error}") from None


def eval_settings_of(config: RunConfig) -> EvalSettings:
    """Return the run's eval settings, raising ConfigError that names the config file."""
    try:
        return EvalSettings.from_dict(config.eval)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{config.source}: {error}") from None


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (see the module doc)."""

    root: Path

    @property
    def plan_dir(self) -> Path:
        return self.root / "plan"

    @property
    def plan_file(self) -> Path:
        return self.plan_dir / PLAN_FILENAME

    @property
    def config_file(self) -> Path:
        return self.plan_dir / CONFIG_FILE

    @property
    def state_file(self) -> Path:
        return self.root / RUN_STATE_FILE

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def merged_hf_dir(self) -> Path:
        return self.root / "merged_hf"

    @property
    def joint_dir(self) -> Path:
        return self.root / "joint"

    @property
    def joint_plan_file(self) -> Path:
        return self.joint_dir / "plan" / PLAN_FILENAME

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    @property
    def report_file(self) -> Path:
        return self.root / REPORT_MARKDOWN

    def branch_dir(self, index: int) -> Path:
        return self.root / "branches" / str(index)

    def final_dir(self, model: str) -> Path:
        """Return the parameter checkpoint of ``branch_<k>``, ``merged`` or ``joint``."""
        if model == "merged":
            return self.merged_dir / "final"
        if model == JOINT_MODEL:
            return self.joint_dir / "branches" / "0" / "final"
        if model.startswith("branch_"):
            return self.branch_dir(int(model.removeprefix("branch_"))) / "final"
        raise ValueError(f"model {model!r} has no checkpoint in a run directory")


def run_dir_of_plan(plan_file: Path) -> Path:
    """Return the run directory of a plan file: the parent of the plan's directory."""
    return plan_file.absolute().parent.parent


def plan_file_of(path: str | Path) -> Path:
    """Return plan.json for a path that is plan.json or the directory that contains it."""
    path = Path(path)
    return path / PLAN_FILENAME if path.is_dir() else path


# --------------------------------------------------------------------------- config copy


def config_yaml(config: RunConfig) -> str:
    """Return the resolved run config as YAML, loadable by ``load_config``."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def write_config_copy(config: RunConfig, directory: Path, *, overwrite: bool = False) -> Path:
    """Write ``directory/config.yaml`` (the resolved config) unless an equal one exists.

    Raises ConfigError when the directory already has a config.yaml for other
    settings, unless ``overwrite``.
    """
    path = directory / CONFIG_FILE
    if path.is_file() and not overwrite:
        check_same_config(load_config(path), config, where=directory)
        return path
    write_atomic(path, config_yaml(config).encode("utf-8"), overwrite=overwrite)
    return path


def save_plan_config(
    config: RunConfig, plan_dir: str | Path, *, added: Any = None, overwrite: bool = False
) -> Path:
    """Store the config of a plan next to its plan.json, for ``merit train-branch``.

    ``added`` is the MixtureSpec of datasets that ``merit plan --add`` appended
    to the plan. They are appended to the stored mixture too, so that every
    group's datasets can be loaded from the copy.
    """
    if added is not None:
        from merit_jax.data.spec import MixtureSpec

        mixture = MixtureSpec(datasets=config.data.mixture.datasets + tuple(added.datasets))
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, mixture=mixture))
    return write_config_copy(config, Path(plan_dir), overwrite=overwrite or added is not None)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_same_config(stored: RunConfig, config: RunConfig, *, where: Path) -> None:
    """Raise ConfigError listing the settings in which ``config`` differs from ``stored``.

    ``output_dir`` is ignored, because a run directory may be moved or named with --out.
    """
    old, new = stored.to_dict(), config.to_dict()
    old.pop("output_dir"), new.pop("output_dir")
    differences = _differences(old, new)
    if differences:
        listing = "\n".join(f"  - {line}" for line in differences[:20])
        more = f"\n  ... and {len(differences) - 20} more" if len(differences) > 20 else ""
        raise ConfigError(
            f"{where} was started with another config ({where / CONFIG_FILE}):\n{listing}{more}\n"
            "Resume it with the same config, pass --overwrite to start it again, or choose "
            "another output directory."
        )


def load_run_config(plan_file: Path, config_path: str | Path | None = None) -> RunConfig:
    """Return the config of a plan: ``config_path``, else config.yaml next to plan.json."""
    path = Path(config_path) if config_path is not None else plan_file.parent / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"run config {path} not found: pass the run config the plan was made from "
            "(--config CONFIG), or make the plan with `merit run`, which stores it there"
        )
    return load_config(path)


# --------------------------------------------------------------------------- run state


class StageClock:
    """The wall time of every stage, kept in run.json across invocations.

    With ``path`` None the times are only kept in memory.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            for name, value in stored.get("stages", {}).items():
                self.stages[name] = {"seconds": float(value["seconds"]), "status": "earlier"}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (added to earlier time spent in it) and save."""
        logger.info("stage %s: starting", name)
        start = time.perf_counter()
        earlier = self.stages.get(name, {}).get("seconds", 0.0)
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.stages[name] = {"seconds": earlier + seconds, "status": "ran"}
            self.save()
            logger.info("stage %s: %.1f s", name, seconds)

    def skip(self, name: str, reason: str) -> None:
        """Record that stage ``name`` was already done."""
        logger.info("stage %s: skipped, %s", name, reason)
        self.stages.setdefault(name, {"seconds": 0.0, "status": "earlier"})
        self.stages[name]["status"] = "earlier"
        self.save()

    def ordered(self) -> dict[str, dict[str, Any]]:
        known = [name for name in STAGES if name in self.stages]
        return {name: self.stages[name] for name in known + sorted(set(self.stages) - set(STAGES))}

    def save(self) -> None:
        if self.path is None:
            return
        payload = {"format": 1, "stages": self.ordered()}
        text = json.dumps(payload, indent=2) + "\n"
        write_atomic(self.path, text.encode("utf-8"), overwrite=True)

    def table(self) -> str:
        """Return the stage times as aligned text lines."""
        stages = self.ordered()
        total = sum(value["seconds"] for value in stages.values())
        lines = [f"{'stage':<12} {'seconds':>9} {'share':>6}  status"]
        for name, value in stages.items():
            share = 100 * value["seconds"] / total if total else 0.0
            lines.append(f"{name:<12} {value['seconds']:>9.1f} {share:>5.0f}%  {value['status']}")
        lines.append(f"{'total':<12} {total:>9.1f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- output dir


def prepare_run_dir(layout: RunLayout, config: RunConfig, *, overwrite: bool) -> None:
    """Create, resume, or (with ``overwrite``) clear the run directory; write config.yaml.

    A directory that contains only ``plan/`` (left by ``merit plan`` with the
    same output_dir) counts as a run, so its plan and stored gradients are
    reused. Raises FileExistsError for a finished run without ``overwrite``
    and for a non-empty directory that is not a run directory.
    """
    root = layout.root
    is_run = layout.config_file.is_file() or layout.state_file.is_file()
    if root.is_dir() and [entry.name for entry in root.iterdir()] == [layout.plan_dir.name]:
        is_run = True
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"output directory {root} is a file; choose another --out")
    if root.is_dir() and any(root.iterdir()) and not is_run:
        raise FileExistsError(
            f"output directory {root} is not empty and contains no run ({layout.config_file} is "
            "missing); choose another --out, or empty the directory"
        )
    if overwrite and root.is_dir() and is_run:
        logger.warning("removing the earlier run in %s (--overwrite)", root)
        shutil.rmtree(root)
    elif layout.report_file.is_file():
        raise FileExistsError(
            f"{root} contains a finished run ({layout.report_file} exists); pass --overwrite to "
            "run it again from scratch, or choose another output directory"
        )
    elif is_run:
        logger.info("resuming the run in %s", root)
    layout.plan_dir.mkdir(parents=True, exist_ok=True)
    write_config_copy(config, layout.plan_dir)
