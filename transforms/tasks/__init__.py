"""Task adapters, one module per task family, and the registry that names them.

A spec's `task` may also name a plugin: an adapter class outside this package, given as
`module.path:ClassName` or registered under the `beam_enrich.tasks` entry-point group.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points

from transforms.tasks.base import Params, Runner, TaskAdapter
from transforms.tasks.feature_extraction import FeatureExtraction
from transforms.tasks.fill_mask import FillMask
from transforms.tasks.question_answering import QuestionAnswering
from transforms.tasks.seq2seq import Summarization, Translation
from transforms.tasks.text_classification import TextClassification
from transforms.tasks.text_generation import TextGeneration
from transforms.tasks.token_classification import TokenClassification
from transforms.tasks.zero_shot import ZeroShotClassification

__all__ = [
    "ADAPTERS",
    "PLUGIN_GROUP",
    "Params",
    "Runner",
    "TaskAdapter",
    "adapter_for",
    "installed_plugins",
    "is_plugin_task",
]

#: The entry-point group plugin packages register their adapter classes under.
PLUGIN_GROUP = "beam_enrich.tasks"

#: Every task name a spec may use, mapped to the adapter class that runs it.
ADAPTERS: dict[str, type[TaskAdapter]] = {
    task: adapter
    for adapter in (
        TextClassification,
        TokenClassification,
        FeatureExtraction,
        ZeroShotClassification,
        FillMask,
        TextGeneration,
        QuestionAnswering,
        Summarization,
        Translation,
    )
    for task in adapter.tasks
}


def adapter_for(task: str) -> type[TaskAdapter]:
    """The adapter class for a task name: a built-in one, else a plugin.

    Args:
        task: a name in `ADAPTERS`, `module.path:ClassName`, or the name of an
            installed entry point in the `beam_enrich.tasks` group.

    Raises:
        ValueError: the task is none of these, its plugin cannot be imported, or what it
            names is not a `TaskAdapter` subclass.
    """
    if task in ADAPTERS:
        return ADAPTERS[task]
    if ":" in task:
        module, _, name = task.partition(":")
        if not module.strip() or not name.strip():
            raise ValueError(f"plugin task {task!r}: expected module.path:ClassName")
        # pkgutil.resolve_name is the standard library's `module:attr` lookup, the same
        # form entry points use.
        return _load_plugin(lambda: pkgutil.resolve_name(task), task)
    plugins = entry_points(group=PLUGIN_GROUP)
    if task in plugins.names:
        entry = plugins[task]
        return _load_plugin(entry.load, f"{entry.value} (entry point {task!r})")
    raise ValueError(
        f"unknown task {task!r}; expected one of {', '.join(ADAPTERS)}, a plugin class as "
        f"module.path:ClassName, or an installed {PLUGIN_GROUP} entry point "
        f"({_listing(installed_plugins())})"
    )


def installed_plugins() -> dict[str, str]:
    """Every installed plugin task: entry-point name -> `module.path:ClassName`."""
    return {entry.name: entry.value for entry in entry_points(group=PLUGIN_GROUP)}


def is_plugin_task(task: str) -> bool:
    """Whether a task names a plugin (a class path or an installed entry point)."""
    return task not in ADAPTERS and (":" in task or task in installed_plugins())


def _listing(plugins: dict[str, str]) -> str:
    if not plugins:
        return "none installed"
    return "installed: " + ", ".join(f"{name} = {value}" for name, value in plugins.items())


def _load_plugin(load: Callable[[], object], origin: str) -> type[TaskAdapter]:
    try:
        found = load()
    except ModuleNotFoundError as err:
        raise ValueError(
            f"plugin {origin}: no module named {err.name!r}; install the package that "
            "provides it (on the workers too) or fix the module path"
        ) from None
    except AttributeError as err:
        raise ValueError(f"plugin {origin}: {err}; check the class name after ':'") from None
    except Exception as err:  # the plugin's own module failed while importing
        raise ValueError(
            f"plugin {origin}: importing it failed: {type(err).__name__}: {err}"
        ) from None
    if not (isinstance(found, type) and issubclass(found, TaskAdapter)) or found is TaskAdapter:
        kind = f"class {found.__name__}" if isinstance(found, type) else type(found).__name__
        raise ValueError(
            f"plugin {origin} is a {kind}, not a TaskAdapter subclass; a plugin task must "
            "subclass transforms.tasks.TaskAdapter"
        )
    return found
