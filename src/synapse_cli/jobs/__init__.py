"""Job kinds: each one a ``JobKind`` record declared once, in its own package.

A kind's generator is a plain function ``spec -> Iterator[Event]``. Nothing here
imports typer, rich or modal, so the same generator runs in-process, inside a
Modal container, or behind the HTTP endpoint. Heavy libraries (ultralytics, the
decoding engines) are imported inside the job functions, never at module import.

``JOBS`` maps a kind's name to its record. Everything else that knows about
kinds (the CLI commands and their common options, the config registry, the
Modal functions, the backends' path handling, the server routes) reads these
records; adding a kind is one ``register_kind(...)`` (see docs/kinds.md).
Records name their spec class, generator and CLI command as ``"module:attr"``,
loaded lazily, so ``synapse --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping

from synapse_cli.events import Event

# Spec fields that name something on the machine that runs the job (a binary, a cache): the
# caller's value means nothing remotely, so remote backends drop them and the spec's default
# (whatever the remote machine has) applies. A spec class declares its own ``HOST_FIELDS``.
DEFAULT_HOST_FIELDS = ("ffmpeg", "ffmpeg_path", "cache_dir")


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class JobKind:
    """Everything synapse needs to know about one job kind.

    - ``spec``/``run``: ``"module:attr"`` of the spec dataclass (with ``INPUTS``, ``OUTPUTS``,
      ``HOST_FIELDS``, ``INSTALLED`` class attributes) and of the generator.
    - ``build``: ``"module:attr"`` of the spec builder, ``build(settings, *positional, overwrite,
      cache, **options) -> spec``: the one place a kind's options become a validated spec, called
      by its CLI command, by the Python API and by anything else that runs the kind from options
      (``synapse_cli.pipeline``). Its positional-or-keyword parameters after ``settings`` are the
      API's positional arguments (``export("clip.mp4", ...)``). None: the kind runs from specs only.
    - ``options``: the kind's options that are settings, option name -> setting key
      (``{"task": "infer.task"}``): given, they rank as flags (flag > env > file > default) and
      the builder reads them from ``settings``.
    - ``command``: ``"module:attr"`` of the CLI command (a function declaring the kind's own
      options and a ``common`` parameter), or None for a kind reached only through a backend.
    - ``settings``: the kind's ``[<name>]`` section of the config, key -> ``config.Setting``.
    - ``remote``: False for a kind the CLI runs in this process only (no Modal functions, and
      its command has no remote options; ``synapse serve`` still runs it); ``image`` (a recipe of ``synapse_cli/modal_app.py``:
      ``media``, ``engines`` or ``yolo``), ``gpu`` and ``packages`` (pip requirements on top of
      the recipe) are its Modal needs.
    - ``split``/``merge``/``size``: how to shard it (``"module:attr"``, None: it does not shard;
      see ``synapse_cli.shards``). ``split(spec, n, workdir, settings) -> [spec]`` cuts it into
      up to ``n`` shard specs writing pieces into ``workdir``; ``merge(spec, shards, results,
      workdir)`` is a generator that joins the pieces into the real outputs and ends with the
      job's ``Finished``; ``size(spec)`` is what ``--shards auto`` divides by the ``[shards]``
      setting named in ``shard_by`` (``seconds`` of media, or ``units``: inputs).
      ``beside(spec, workdir)`` (optional) is a generator for work the merge needs but the
      shards do not (export: the audio, encoded once over the whole timeline): it runs in
      this process while the shards run, writing into ``workdir``, so the merge only joins.
    - ``names``: ``"module:attr"`` of ``names(data, output_dir=None) -> data``, the one place a kind's
      output names are settled: it fills in each output a spec leaves out (None or absent) with the
      name the CLI derives (from the inputs' names; ``output_dir``: the kind's output folder setting)
      and refuses a name the job cannot write (``UsageError`` naming the field). The CLI, the Python
      API (through the CLI's builder) and ``synapse serve`` all call it before a job starts.
    """

    name: str
    spec: str
    run: str
    build: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    command: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    remote: bool = True
    image: str = "media"
    gpu: bool = False
    packages: tuple[str, ...] = ()
    split: str | None = None
    merge: str | None = None
    size: str | None = None
    beside: str | None = None
    shard_by: str = "seconds"
    names: str | None = None

    @property
    def shardable(self) -> bool:
        return self.split is not None and self.merge is not None

    def hook(self, name: str) -> Callable[..., Any]:
        """The ``build``, ``split``, ``merge``, ``size``, ``beside`` or ``names`` function, loaded on first use."""
        ref = getattr(self, name)
        if ref is None:
            raise ValueError(f"job kind {self.name!r} has no {name} hook")
        return _load(ref)

    def spec_class(self) -> type:
        return _load(self.spec)

    def generator(self) -> Callable[[Any], Iterator[Event]]:
        return _load(self.run)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Spec fields naming local files or folders the job reads: a path or a list of paths."""
        return tuple(getattr(self.spec_class(), "INPUTS", ()))

    @property
    def outputs(self) -> tuple[str, ...]:
        """Spec fields naming what the job writes: a path or a list of paths; a name ending in
        ``_dir`` is a directory output."""
        return tuple(getattr(self.spec_class(), "OUTPUTS", ()))

    @property
    def host_fields(self) -> tuple[str, ...]:
        """Spec fields about the machine that runs the job (dropped remotely, not part of a cache key)."""
        return tuple(getattr(self.spec_class(), "HOST_FIELDS", DEFAULT_HOST_FIELDS))

    @property
    def installed(self) -> tuple[str, ...]:
        """Spec fields naming something the machine's owner installed (resolved by name remotely, never uploaded)."""
        return tuple(getattr(self.spec_class(), "INSTALLED", ()))


JOBS: dict[str, JobKind] = {}

def _builtin_modules() -> tuple[str, ...]:
    """The public modules and packages under ``jobs/``: each that declares a ``KIND`` record is a kind
    (``_files``, ``_media``... are helpers), so a new built-in kind is its package, nothing to list."""
    import os

    here = os.path.dirname(__file__)
    names = {n[:-3] if n.endswith(".py") else n for n in os.listdir(here)
             if not n.startswith(("_", ".")) and (n.endswith(".py") or os.path.isfile(os.path.join(here, n, "__init__.py")))}  # fmt: skip
    return tuple(f"{__name__}.{n}" for n in sorted(names))


BUILTIN = _builtin_modules()


def register_kind(kind: JobKind) -> JobKind:
    """Add (or replace) a kind: the one place a kind is made known to synapse."""
    JOBS[kind.name] = kind
    return kind


def get_kind(kind: str) -> JobKind:
    try:
        return JOBS[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(JOBS)}") from None


def load_job(kind: str) -> Callable[[Any], Iterator[Event]]:
    return get_kind(kind).generator()


def spec_class(kind: str) -> type:
    return get_kind(kind).spec_class()


def path_values(value: Any, what: str, name: str) -> list[tuple[int | None, str]]:
    """The one rule for an ``INPUTS``/``OUTPUTS`` field: None (no path), a path (index None),
    or a list of paths (each with its index). Anything else is a UsageError naming the field."""
    if value is None:
        return []
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(enumerate(value))
    from synapse_cli.errors import UsageError

    raise UsageError(f"spec {what} {name!r} must be a path or a list of paths")


def settle_names(kind: str, data: Mapping[str, Any], output_dir: Any = None) -> dict[str, Any]:
    """``data`` with the kind's default outputs filled in and its output names checked (its ``names``
    hook; a kind without one is returned as it is). Raises ``UsageError`` naming the field."""
    record = get_kind(kind)
    return dict(record.hook("names")(dict(data), output_dir)) if record.names else dict(data)


def select_installed(kind: str, spec: dict[str, Any], models_dir: Any) -> dict[str, Any]:
    """Point every ``INSTALLED`` field (a model name) at the owner-installed file it names.

    The one place a remote spec's model is resolved: a name, looked up among what the
    machine's owner installed; a path, an uploaded file or an unknown name is a UsageError.
    """
    cls: Any = spec_class(kind)  # a spec class with INSTALLED fields has select_installed
    out = dict(spec)
    for name in get_kind(kind).installed:
        if out.get(name) is not None:
            out[name] = cls.select_installed(name, out[name], models_dir)
    return out


def spec_to_dict(spec: Any) -> dict[str, Any]:
    return asdict(spec)


def spec_from_dict(kind: str, data: dict[str, Any]) -> Any:
    """Rebuild a spec that crossed a boundary; unknown keys are a usage error."""
    from synapse_cli.errors import UsageError

    cls = spec_class(kind)
    names = {f.name for f in fields(cls)}
    extra = sorted(set(data) - names)
    if extra:
        raise UsageError(f"unknown {kind} spec field(s): {', '.join(extra)}")
    return cls(**data)


# Kinds from other installed packages: an entry point in this group names a ``JobKind`` record,
# as llm finds its plugins. ``pyproject.toml`` of such a package:
#     [project.entry-points."synapse_cli.kinds"]
#     echo = "synapse_echo:KIND"
ENTRY_POINTS = "synapse_cli.kinds"


def _declared_entry_points() -> bool:
    """Does any distribution on ``sys.path`` declare our group? A look at each ``entry_points.txt``
    (about 2 ms for 150 distributions) spares every command importlib.metadata (about 45 ms) when none does."""
    import os
    import sys

    marker = f"[{ENTRY_POINTS}]"
    for folder in sys.path:
        try:
            names = os.listdir(folder or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info"):
                try:
                    with open(os.path.join(folder or ".", name, "entry_points.txt"), encoding="utf-8") as f:
                        if marker in f.read():
                            return True
                except OSError:
                    continue
    return False


def load_plugins() -> list[str]:
    """Register the kinds that installed packages declare in the ``synapse_cli.kinds`` entry-point
    group; return their names. A plugin that fails to load is skipped with one line on stderr,
    so one broken package cannot take every command down."""
    if not _declared_entry_points():
        return []
    import sys
    from importlib.metadata import entry_points

    loaded = []
    for point in entry_points(group=ENTRY_POINTS):
        try:
            record = point.load()
            if not isinstance(record, JobKind):
                raise TypeError(f"{point.value} is not a JobKind")
        except Exception as exc:  # noqa: BLE001 (a third party's error, reported and skipped)
            print(f"synapse: skipping job kind plugin {point.name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if record.name in BUILTIN_NAMES:
            print(f"synapse: skipping job kind plugin {point.name!r}: {record.name!r} is a built-in kind", file=sys.stderr)
            continue
        register_kind(record)
        loaded.append(record.name)
    return loaded


for _module in BUILTIN:
    _kind = getattr(importlib.import_module(_module), "KIND", None)
    if isinstance(_kind, JobKind):  # (a public module that is not a kind is left alone)
        register_kind(_kind)
BUILTIN_NAMES = frozenset(JOBS)
load_plugins()
