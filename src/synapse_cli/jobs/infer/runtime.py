"""Importing ultralytics offline, loading a model, and giving torch its threads.

Ultralytics reads its environment once, at import: ``YOLO_OFFLINE=1`` stops
its connectivity checks and usage analytics, ``YOLO_AUTOINSTALL=False`` stops
it pip-installing missing packages at run time, and ``YOLO_CONFIG_DIR`` keeps
the ``settings.json`` it writes on first import in a synapse-owned directory
(unless the user chose one). Its logger writes to stdout, which carries our
NDJSON, so we point it at stderr.

``OMP_WAIT_POLICY=PASSIVE`` (unless set): where torch still runs several
intra-op threads (a GPU box's pre/post-processing, more than
``inference.MAX_WORKERS`` cores), spinning OpenMP threads collapse when
another process holds a core (0.6 instead of 9.5 fps in one measurement on
the shared 2-core box). OpenMP reads it when torch loads, so this must run
before torch is imported.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from synapse_cli.errors import UsageError, one_line

SUPPORTED_MODEL_TASKS = ("detect", "pose", "segment")


def prepare_environment(env: Any = None) -> None:
    env = os.environ if env is None else env
    env["YOLO_OFFLINE"] = "1"
    env["YOLO_AUTOINSTALL"] = "False"
    env.setdefault("YOLO_VERBOSE", "False")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not env.get("YOLO_CONFIG_DIR"):
        from synapse_cli.jobs.infer.weights import cache_dir

        env["YOLO_CONFIG_DIR"] = str(cache_dir())  # ultralytics adds /Ultralytics/settings.json
    Path(env["YOLO_CONFIG_DIR"]).mkdir(parents=True, exist_ok=True)


class _StderrHandler(logging.StreamHandler):
    """Always the current ``sys.stderr`` (test runners swap it), never stdout."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _logs_to_stderr() -> None:
    from ultralytics.utils import LOGGER

    for handler in list(LOGGER.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, _StderrHandler):
            replacement = _StderrHandler()
            replacement.setFormatter(handler.formatter)
            replacement.setLevel(handler.level)
            LOGGER.removeHandler(handler)
            LOGGER.addHandler(replacement)


def import_yolo() -> Any:
    """``ultralytics.YOLO``, imported offline, with the torchvision fallback applied if needed."""
    prepare_environment()
    try:
        from ultralytics import YOLO
    except ModuleNotFoundError as exc:
        if exc.name != "ultralytics":
            raise
        raise UsageError(
            "synapse infer needs the infer extra: pip install torch first, then "
            "pip install -c constraints.txt 'synapse-cli[infer]' (install order in docs/infer.md)"
        ) from None

    from synapse_cli.jobs.infer.compat import ensure_torchvision

    ensure_torchvision()
    _logs_to_stderr()
    return YOLO


def load_model(path: Path) -> Any:
    """Load weights; a file ultralytics cannot read as a YOLO model is a UsageError naming it."""
    yolo = import_yolo()
    try:
        model = yolo(str(path))
    except Exception as exc:  # ultralytics raises TypeError, KeyError, pickle errors... for foreign files
        detail = one_line(exc, 200)
        raise UsageError(f"{path.name} is not a YOLO model ({type(exc).__name__}: {detail})") from None
    if getattr(model, "task", None) not in SUPPORTED_MODEL_TASKS:
        raise UsageError(f"{path.name} is a {model.task} model; synapse infer runs detect and pose models")
    return model


class Replicas:
    """Idle model replicas, kept between jobs in this process, by weights file.

    Loading yolo11n-pose and setting up its predictor (ultralytics fuses its layers on the first
    frame) costs about 0.4 s of CPU per replica, for every job: in ``synapse serve``, or a script
    that runs jobs through the Python API, the next job takes a replica the last one left set up.
    A file is known by its real path, size and modification time, so a replaced file loads anew.

    Only CPU replicas come back here (``InferencePool`` returns them when it closes): each job
    gives every argument it predicts with (``predict_args``) on each call, and ultralytics
    updates a set-up predictor's arguments from those. The batched path converts its model
    (half precision, another device) and never returns it.
    """

    def __init__(self, per_file: int = 8, files: int = 4) -> None:
        self.per_file = per_file
        self.files = files
        self._idle: OrderedDict[tuple[str, int, int], list[Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # models loaded from their files (a measure for tests and benchmarks)
        self.reuses = 0  # replicas taken from the idle ones

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)

    def take(self, path: Path) -> Any:
        """An idle replica of ``path``'s model, or a freshly loaded one (``load_model``'s errors)."""
        key = self._key(path)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                self.reuses += 1
                return idle.pop()
            self.loads += 1
        return load_model(path)

    def give_back(self, path: Path, model: Any) -> None:
        try:
            key = self._key(path)
        except OSError:  # the file is gone: so is any use for its replicas
            return
        with self._lock:
            idle = self._idle.setdefault(key, [])
            self._idle.move_to_end(key)
            if len(idle) < self.per_file:
                idle.append(model)
            while len(self._idle) > self.files:
                self._idle.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


REPLICAS = Replicas()


def check_tracking() -> None:
    """ByteTrack needs ``lap``; without it ultralytics would try to pip-install it mid-run."""
    import importlib.util

    if importlib.util.find_spec("lap") is None:
        raise UsageError("--task track needs lap: pip install 'lap>=0.5.12'")


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(configured: int) -> int:
    """``infer.threads``: 0 means every core this process may use."""
    return configured if configured > 0 else available_cores()


def set_threads(n: int) -> None:
    """This thread's torch threads. Ultralytics sets cores - 1 when a predictor starts (``select_device``): call after."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
