"""The Task: the one place user code plugs in.

A task names the model and how to load a checkpoint, the training data, the
per-example training loss ``ℓ(x; θ)`` and the query measurement ``m(q; θ)``
(plus optional concept measurements ``m_c``). Everything else in gradindex is a
plain function of a task and the artifacts written by earlier stages.

Conventions
-----------
* ``compute_train_loss(batch, model)`` returns per-example losses ``[B]``.
* ``compute_measurement(batch, model)`` returns ``[B]`` and is oriented so that
  *higher means the model produces the output more* (a margin or a
  log-probability). Scores are ``τ(q, x) = −∇m(q)ᵀ H⁻¹ ∇ℓ(x)``: the first-order
  increase of ``m(q)`` from a gradient step on ``x``; positive = proponent.
* A model may run each example several times inside one loss (diffusion noise
  draws, say): every module's leading dimension must then be ``R·B`` with the
  ``R`` copies of one example contiguous (``repeat_interleave``), and the
  per-example loss must already combine them.
* Examples must not interact inside a batch (no train-mode BatchNorm): the
  model is put in ``eval()`` mode before gradients are taken.

Load a task from a spec with :func:`load_task`: a built-in name (``digits``),
``path/to/file.py:ClassName`` or ``package.module:ClassName``.

Query splits: :meth:`Task.query_splits` divides the default queries
(``query_dataset()``) into a **fit** split (weight learning) and a disjoint **eval**
split (LDS), deterministically; :func:`task_queries` returns either (or all), and
:func:`query_digests` fingerprints queries one by one so that evaluation can tell
which of its queries were fitted on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradindex.checks import short_repr
from gradindex.config import GroupRule, QuerySplit, parse_enum
from gradindex.errors import (
    ArtifactNotFoundError,
    ConfigError,
    TaskConsentError,
    TaskError,
)
from gradindex.inputs import json_array


class Task:
    """Base class of every attribution task. Subclass it and fill in the hooks."""

    #: concepts this task can measure with :meth:`concept_measurement`
    concepts: tuple[str, ...] = ()

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(f"{type(self).__name__} takes no options, got {sorted(options)}")
        self.options: dict[str, Any] = {}

    # -- required -----------------------------------------------------------------
    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        """Build the model and load ``checkpoint`` into it (``None``: the task's default)."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_model(checkpoint)")

    def train_dataset(self) -> Sequence:
        """The training examples, indexable by position."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_dataset()")

    def compute_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Per-example training losses ``[B]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_train_loss(batch, model)")

    # -- optional, with safe defaults -------------------------------------------------
    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Per-query measurement ``[B]``, higher = produced more. Default: ``−loss``."""
        return -self.compute_train_loss(batch, model)

    def compute_sampled_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Per-example losses ``[B]`` with the targets drawn from the model's own predictive distribution
        (``torch`` global RNG; the caller seeds it): the true Fisher of K-FAC / EK-FAC. Default: not
        defined (the factors then use the empirical Fisher, the training labels)."""
        raise NotImplementedError(f"{type(self).__name__} defines no compute_sampled_loss(batch, model)")

    def concept_measurement(self, batch: Any, model: nn.Module, concept: str) -> torch.Tensor:
        """Measurement ``[B]`` that isolates ``concept`` (DESIGN §1.4)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no concept measurement (asked for concept {concept!r})"
        )

    def train(self, path: str | Path, indices: Sequence[int] | None = None, seed: int = 0) -> Path:
        """Train a model on the training examples at ``indices`` (default: all), save it as a
        checkpoint at ``path`` that :meth:`load_model` reads, and return ``path``. Used by the
        demo and by retraining-based evaluation (LDS)."""
        raise NotImplementedError(f"{type(self).__name__} defines no training routine (train(path, indices, seed))")

    def learning_rates(self) -> Sequence[float] | None:
        """The learning rate of every optimizer step of the default training run (``--damping schedule``
        uses ``1 / Σ_t η_t``), or ``None`` (the default) when the task does not say."""
        return None

    def parameter_groups(self, model: nn.Module) -> Sequence[GroupRule]:
        """Group rules applied before the user's; default: one group per module."""
        return ()

    def collate(self, items: list[Any]) -> Any:
        """Turn a list of dataset items into one batch."""
        return torch.utils.data.default_collate(items)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return _move(batch, device)

    def sample_ids(self, dataset: Sequence) -> np.ndarray:
        """Stable int64 ids of the training examples; default: their positions."""
        return np.arange(len(dataset), dtype=np.int64)

    def metadata(self, dataset: Sequence) -> dict[str, np.ndarray]:
        """Columns stored beside the features (labels, factors); used for display/eval only."""
        return {}

    def query_dataset(self) -> Sequence:
        """Default queries (held-out inputs) for the demo, weight learning and evaluation."""
        raise NotImplementedError(f"{type(self).__name__} defines no default queries")

    def concept_queries(self, concept: str) -> Sequence:
        """Default queries to learn ``concept``'s weights from; default: :meth:`query_dataset`. A generator
        can return samples of prompts that specify only ``concept`` (the paper's concept queries)."""
        return self.query_dataset()

    def query_splits(self, count: int) -> dict[str, np.ndarray]:
        """Positions ``{"fit": [n_fit], "eval": [n_eval]}`` (sorted int64) of the fit and eval queries among
        the ``count`` items of :meth:`query_dataset`: disjoint, together all of them, deterministic.
        Weights are learned on ``fit`` and LDS is measured on ``eval``. Default: a seeded permutation
        of the positions, its first ``count // 2`` for fit and the rest for eval (:func:`default_query_splits`)."""
        return default_query_splits(count)

    def sample_queries(self, model: nn.Module, count: int, seed: int = 0) -> Sequence:
        """``count`` queries for ``model`` (a generator's samples); default: ``count`` items
        of :meth:`query_dataset` spread evenly over it."""
        queries = self.query_dataset()
        count = min(count, len(queries))
        chosen = [int(i) for i in np.linspace(0, len(queries) - 1, count).round()]
        return torch.utils.data.Subset(queries, chosen)

    def load_queries(self, path: str | Path) -> Sequence:
        """Read a query inputs file (format defined by the task)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read query files ({path})")

    def queries_from_json(self, inputs: Any) -> Sequence:
        """Query items from the JSON ``inputs`` of a ``gradindex serve`` request: the fields of a
        query file as JSON — an object of arrays (an ``.npz``'s) or a list of records (a JSONL's).

        Default: write ``inputs`` as the file :meth:`load_queries` reads (an object → ``.npz``,
        each value through ``numpy.asarray``; a list → ``.jsonl``, one record a line) and read it
        back, so a task that reads query files answers requests unchanged. Override it to build
        the items directly (the built-in tasks do).
        """
        import json
        import tempfile

        with tempfile.TemporaryDirectory(prefix="gradindex-queries-") as folder:
            if isinstance(inputs, dict):
                path = Path(folder) / "queries.npz"
                arrays = {str(key): json_array(value, f"inputs.{key}") for key, value in inputs.items()}
                np.savez(path, **arrays)
            elif isinstance(inputs, list):
                path = Path(folder) / "queries.jsonl"
                path.write_text("".join(json.dumps(record) + "\n" for record in inputs), encoding="utf-8")
            else:
                raise ConfigError(f"inputs: expected an object of arrays or a list of records, "
                                  f"got {type(inputs).__name__}")
            return self.load_queries(path)

    def query_from_image(self, image: np.ndarray, fields: dict[str, Any]) -> Any:
        """JSON ``inputs`` (as :meth:`queries_from_json` reads them) for one uploaded image ``[H, W]``
        or ``[H, W, 3]`` (values 0..1) and the user's other ``fields`` (a label, a prompt); used by
        ``gradindex serve``'s page. Default: this task takes no image uploads (its query files can be
        uploaded instead)."""
        raise ConfigError(f"task {type(self).__name__} takes no image uploads; upload a query file "
                          "(the format its load_queries reads) or type the query as JSON")

    def render(self, item: Any) -> np.ndarray | None:
        """An image ``[H, W]`` or ``[H, W, 3]`` of one example, for reports; None if not visual."""
        return None

    def describe(self, item: Any) -> str:
        """A short caption of one example (its label, say)."""
        return ""

    def tokens(self, item: Any) -> list[str] | None:
        """The item's tokens as text, one per position of the sequence axis its modules see (``[B, L, ...]``),
        for token-level attribution (``query --tokens``); None: the task has no token axis."""
        return None

    def spec(self) -> dict[str, Any]:
        """What :func:`load_task` needs to rebuild this task (stored in the manifest)."""
        default = f"{type(self).__module__}:{type(self).__qualname__}"
        return {"task": getattr(self, "_spec", default), "options": dict(self.options)}


#: seed of the default fit/eval permutation of a task's default queries
QUERY_SPLIT_SEED = 20_151


def default_query_splits(count: int) -> dict[str, np.ndarray]:
    """Half of ``range(count)`` for fit (``count // 2`` positions), the rest for eval, by a seeded
    permutation (so neither split is a block of the query set's order), each sorted."""
    order = np.random.default_rng([QUERY_SPLIT_SEED, int(count)]).permutation(int(count))
    half = int(count) // 2
    return {"fit": np.sort(order[:half]).astype(np.int64), "eval": np.sort(order[half:]).astype(np.int64)}


def has_concept_queries(task: Task, concept: str) -> bool:
    """Whether ``concept`` (not ``all``) has its own learning queries: the task overrides
    :meth:`Task.concept_queries`."""
    return concept != "all" and type(task).concept_queries is not Task.concept_queries


def task_queries(task: Task, split: QuerySplit | str = QuerySplit.ALL, concept: str = "all") -> Sequence:
    """The task's default queries of ``split``: all of ``query_dataset()``, or the ``Subset`` of its
    fit or eval positions (checked: disjoint, in range, together all of them). For a concept whose
    task defines :meth:`Task.concept_queries`, those (generated learning queries, apart from the
    evaluation queries) whatever the split."""
    split = parse_enum(QuerySplit, split, "query split")
    if has_concept_queries(task, concept):
        return task.concept_queries(concept)
    dataset = default_queries(task)
    if split is QuerySplit.ALL:
        return dataset
    return torch.utils.data.Subset(dataset, query_split_positions(task, len(dataset))[split.value].tolist())


def query_split_positions(task: Task, count: int) -> dict[str, np.ndarray]:
    """``task.query_splits(count)``, validated."""
    splits = task.query_splits(count)
    name = type(task).__name__
    try:
        fit, held = (np.asarray(splits[key], dtype=np.int64).reshape(-1) for key in ("fit", "eval"))
    except (KeyError, TypeError, ValueError) as err:
        raise TaskError(f"{name}.query_splits({count}) must return {{'fit': positions, 'eval': positions}} "
                        f"({type(err).__name__}: {err})") from None
    both = np.concatenate([fit, held])
    if len(both) != count or len(np.unique(both)) != count or (count and (both.min() < 0 or both.max() >= count)):
        raise TaskError(f"{name}.query_splits({count}): the fit and eval positions must be disjoint and together "
                        f"cover 0..{count - 1} once each (got {len(fit)} fit and {len(held)} eval positions)")
    return {"fit": np.sort(fit), "eval": np.sort(held)}


def dataset_metadata(task: Task, dataset: Sequence) -> dict[str, np.ndarray]:
    """``task.metadata(dataset)``, also for a (nested) ``Subset`` of a dataset the task knows: its
    columns at the subset's positions."""
    if isinstance(dataset, torch.utils.data.Subset):
        positions = np.asarray(dataset.indices, dtype=np.int64)
        return {name: np.asarray(values)[positions] for name, values in dataset_metadata(task, dataset.dataset).items()}
    return task.metadata(dataset)


def query_digests(dataset: Sequence) -> list[str]:
    """A short sha256 per query item ``[n]`` (over its tensors, arrays and values): equal items have equal
    digests wherever they come from (the task's defaults or a query file)."""
    digests = []
    for i in range(len(dataset)):
        digest = hashlib.sha256()
        hash_into(digest, dataset[i])
        digests.append(digest.hexdigest()[:16])
    return digests


def hash_into(digest: Any, value: Any) -> None:
    """Feed ``value`` (tensors, arrays, mappings, sequences, plain values) into a hashlib ``digest``."""
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous()
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    elif isinstance(value, np.ndarray):
        digest.update(f"{value.shape}{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value):
            digest.update(str(key).encode())
            hash_into(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            hash_into(digest, item)
    else:
        digest.update(repr(value).encode())


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: _move(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(value, device) for value in batch)
    return batch


def default_queries(task: Task, concept: str = "all") -> Sequence:
    """``task.query_dataset()`` (a concept's: ``task.concept_queries(concept)`` where the task defines it),
    or a one-line error asking for ``--inputs`` when the task has none."""
    if has_concept_queries(task, concept):
        return task.concept_queries(concept)
    message = (f"task {type(task).__name__} defines no default queries (query_dataset()); "
               "pass a query inputs file with --inputs FILE")
    if type(task).query_dataset is Task.query_dataset:
        raise ConfigError(message)
    try:
        return task.query_dataset()
    except NotImplementedError:
        raise ConfigError(message) from None


def require_training_routine(task: Task, what: str = "LDS") -> None:
    """A one-line error unless the task overrides :meth:`Task.train` (retraining needs it)."""
    if type(task).train is Task.train:
        raise ConfigError(f"task {type(task).__name__} defines no train(path, indices, seed); {what} needs to "
                          "retrain the model on subsets of the training set, so it cannot run on this task")


def make_batch(task: Task, dataset: Sequence, indices: Sequence[int] | np.ndarray) -> Any:
    """``task.collate`` of the given dataset positions.

    A ``TensorDataset`` under the default collate is indexed once per tensor (the same list
    of stacked tensors ``default_collate`` builds item by item, a few times faster). Every tensor
    of the batch is made contiguous (:func:`contiguous_batch`), a user's collate's too.
    """
    if isinstance(dataset, torch.utils.data.TensorDataset) and type(task).collate is Task.collate:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return [tensor[index].contiguous() for tensor in dataset.tensors]
    return contiguous_batch(task.collate([dataset[int(i)] for i in indices]))


def contiguous_batch(batch: Any) -> Any:
    """``batch`` (a tensor, or dicts/lists/tuples of them) with every tensor in row-major layout.

    torch 2.13's oneDNN convolution backward corrupts the heap on AVX2-only CPUs when its input has
    channels-last strides (an ``[n, H, W, C]`` array ``permute``d to ``[n, C, H, W]``); see
    docs/cpu-portability.md and tools/repro_onednn_channels_last.py. A no-op for contiguous tensors.
    """
    if isinstance(batch, torch.Tensor):
        return batch.contiguous()
    if isinstance(batch, dict):
        return {key: contiguous_batch(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(contiguous_batch(value) for value in batch)
    return batch


#: modules that moved; a store written before the move names the old one (0.1.0: ``gradindex.tasks.hf``)
MOVED_MODULES = {"gradindex.tasks.hf": "gradindex.integrations.hf"}


def is_builtin_spec(spec: str) -> bool:
    """Whether ``spec`` names gradindex's own code: a built-in name, ``gradindex.tasks.<module>:Class`` or
    ``gradindex.integrations.<module>:Class`` (never a file path). Other specs run code from elsewhere and need the user's consent when a
    store names them (:func:`gradindex.features.query.load_store_task`)."""
    from gradindex.tasks import BUILTIN_TASKS

    if spec in BUILTIN_TASKS:
        return True
    target, sep, name = resolve_spec(spec).rpartition(":")
    parts = target.split(".")
    return (bool(sep and name) and parts[:2] in (["gradindex", "tasks"], ["gradindex", "integrations"]) and len(parts) == 3
            and parts[2].isidentifier() and name.isidentifier())


def resolve_spec(spec: str) -> str:
    """``spec`` with a ``file.py`` path made absolute (the form stored in a manifest: it works from
    any directory), a module that moved named by its new place (:data:`MOVED_MODULES`); other specs unchanged."""
    target, sep, name = spec.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{name}"
    if sep and target in MOVED_MODULES:
        return f"{MOVED_MODULES[target]}:{name}"
    return spec


def load_task(spec: str, options: dict[str, Any] | None = None) -> Task:
    """Instantiate a task from a built-in name, ``file.py:Class`` or ``module:Class``.

    The task records its spec with a file path resolved (:func:`resolve_spec`), so the manifest of
    a store featurized from a relative ``tasks.py:MyTask`` works from any directory.
    """
    from gradindex.tasks import BUILTIN_TASKS

    options = dict(options or {})
    if spec in BUILTIN_TASKS:
        module_name, class_name, defaults = BUILTIN_TASKS[spec]
        cls = getattr(importlib.import_module(module_name), class_name)
        accepted = task_options(cls)
        unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
        if unknown:
            raise ConfigError(f"task {spec!r}: unknown option(s) {', '.join(unknown)}; it accepts "
                              f"{', '.join(accepted) or 'no options'}")
        check_option_types(spec, cls, options)
        try:
            task = cls(**{**defaults, **options})
        except (TypeError, ValueError, OverflowError) as err:
            raise ConfigError(f"task {spec!r}: options {short_repr(options)} rejected ({err})") from None
    else:
        cls = _import_task_class(resolve_spec(spec))
        try:
            task = cls(**options)
        except TypeError as err:
            raise ConfigError(f"task {spec!r}: cannot construct {cls.__name__} with options {options}: {err}") from None
    if not isinstance(task, Task):
        raise TaskError(f"task {spec!r}: {type(task).__name__} is not a subclass of gradindex.Task")
    task._spec = resolve_spec(spec)
    return task


@contextlib.contextmanager
def training_refused(task: Task, why: str | None) -> Iterator[None]:
    """Within the block, ``task.train`` raises ``TaskConsentError(why)`` (``why`` None: no change): a
    built-in task's ``load_model`` trains its default checkpoint when none is cached, and a store's
    options (``epochs``, ``seed``) must not make a query train."""
    if why is None:
        yield
        return

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TaskConsentError(why)

    task.train = refuse
    try:
        yield
    finally:
        del task.train


def check_option_types(spec: str, cls: type, options: dict[str, Any]) -> None:
    """A one-line ``ConfigError`` unless every option value fits the type the built-in task's
    ``__init__`` annotates (``int``: an integer, not a bool, within int64; ``float``: a finite number;
    ``str``; ``bool``; ``None`` where the annotation allows it). Options come from ``--task-option``
    (JSON values) and from a store's manifest, so ``null``, objects, lists and ``1e400`` reach here."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate: nothing to check against
        return
    for name, value in options.items():
        hint = hints.get(name)
        if hint is None:
            continue
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if not any(_fits(value, kind) for kind in allowed):
            names = " or ".join("null" if kind is type(None) else getattr(kind, "__name__", str(kind))
                                for kind in allowed)
            raise ConfigError(f"task {spec!r}: option {name} expects {names}, got {short_repr(value)}")


def _fits(value: Any, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    return True  # another annotation (Any, a container): the task checks it


def task_options(cls: type) -> list[str] | None:
    """The keyword options ``cls(**options)`` accepts (``None``: any, it takes ``**options``)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters) and cls.__init__ is not Task.__init__:
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def task_code_error(err: BaseException) -> str | None:
    """One line describing ``err`` if it was raised inside a user's task code, else ``None``.

    User task code is any method of a :class:`Task` subclass defined outside gradindex (and
    the code it calls) and the module of a ``file.py:Class`` spec. The line names the hook
    gradindex called (the outermost such frame: ``compute_train_loss``, ``__init__``, …), the
    exception and the innermost ``file:line`` of the user's file, e.g.
    ``task hook compute_train_loss raised ValueError: bad shape (my_task.py:42)``. A
    ``SystemExit`` from task code becomes such a line too (exit status 2, not the task's).
    """
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    hook, user_files = None, set()
    for tb in frames:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames[:1] else None
        if isinstance(owner, Task) and not type(owner).__module__.startswith("gradindex."):
            hook = hook or f"{type(owner).__name__}.{frame.f_code.co_name}"
            user_files.update(defining_files(type(owner)))
        elif str(frame.f_globals.get("__name__", "")).startswith(_FILE_MODULE_PREFIX):
            hook = hook or f"{frame.f_code.co_name} (module {frame.f_code.co_filename})"
            user_files.add(frame.f_code.co_filename)
    if hook is None:
        return None
    where = next((tb for tb in reversed(frames) if tb.tb_frame.f_code.co_filename in user_files), None)
    location = f" ({where.tb_frame.f_code.co_filename}:{where.tb_lineno})" if where is not None else ""
    if isinstance(err, SystemExit):
        what = f"called sys.exit({err.code!r})"
    else:
        text = " ".join(str(err).split())
        what = f"raised {type(err).__name__}" + (f": {text[:300]}" if text else "")
    return f"task hook {hook} {what}{location}"


def defining_files(cls: type) -> set[str]:
    """Source files of ``cls`` and of its non-gradindex base classes."""
    files = set()
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and not klass.__module__.startswith(("gradindex.", "builtins")):
            path = getattr(module, "__file__", None)
            if path:
                files.add(path)
    return files


_FILE_MODULE_PREFIX = "_gradindex_task_"


def _import_task_class(spec: str) -> type:
    from gradindex.tasks import BUILTIN_TASKS

    target, sep, class_name = spec.rpartition(":")
    if not sep or not target or not class_name:
        raise ConfigError(
            f"task {spec!r}: expected a built-in name ({', '.join(sorted(BUILTIN_TASKS))}), "
            "path/to/file.py:ClassName or package.module:ClassName"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ArtifactNotFoundError(f"task {spec!r}: no such file {path}")
        module_name = f"{_FILE_MODULE_PREFIX}{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except (Exception, SystemExit) as err:  # a task module calling sys.exit() must not end gradindex
                del sys.modules[module_name]
                raise TaskError(f"task {spec!r}: importing {path} failed: {_import_failure(err)}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ArtifactNotFoundError(f"task {spec!r}: cannot import module {target!r}: {err}") from None
        except (Exception, SystemExit) as err:
            raise TaskError(f"task {spec!r}: importing module {target!r} failed: {_import_failure(err)}") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"task {spec!r}: {target} defines no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"task {spec!r}: {class_name} is not a subclass of gradindex.Task")
    return cls


def _import_failure(err: BaseException) -> str:
    """``TypeName: message (file:line)`` of an exception raised while a task module was imported."""
    if isinstance(err, SystemExit):
        what = f"it called sys.exit({err.code!r})"
    else:
        what = f"{type(err).__name__}: {' '.join(str(err).split())}"
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
    if isinstance(err, SyntaxError):
        return f"{what} ({err.filename}:{line})"
    return f"{what} ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else what


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
