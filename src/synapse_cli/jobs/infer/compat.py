"""Compatibility shim: ultralytics without a working ``torchvision``.

Ultralytics imports ``torchvision`` before the first inference, only so that
its NMS uses ``torchvision.ops.nms`` (``ultralytics/utils/nms.py`` checks
``"torchvision" in sys.modules``). Some machines have a torchvision wheel
built for CUDA next to a CPU-only torch; importing it then fails with
``RuntimeError: operator torchvision::nms does not exist``.

Only in that case we register a stand-in ``torchvision`` module whose
``ops.nms`` is ultralytics' own pure-torch ``TorchNMS.nms`` (same results,
documented to match torchvision). Detect, pose and track need nothing else
from torchvision. On a machine where torchvision imports (a normal install,
the Modal GPU image) nothing is patched.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

_MARKER = "__synapse_nms_fallback__"


def _broken_nms(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "torchvision::nms" in str(exc)


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` safe for ultralytics. Returns True if the fallback was installed."""
    current = sys.modules.get("torchvision")
    if current is not None:
        return bool(getattr(current, _MARKER, False))
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        if not _broken_nms(exc):
            raise
    else:
        return False
    # The failed import leaves half-initialised submodules behind; drop them so
    # nothing later picks up a torchvision that never finished loading.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    from ultralytics.utils.nms import TorchNMS

    ops = types.ModuleType("torchvision.ops")
    ops.nms = TorchNMS.nms  # type: ignore[attr-defined]
    stub = types.ModuleType("torchvision")
    stub.__doc__ = "synapse stand-in: torchvision failed to load (CUDA build on CPU torch); NMS from ultralytics."
    stub.ops = ops  # type: ignore[attr-defined]
    # a spec, so that importlib.util.find_spec("torchvision") (asked by other libraries in this
    # process, e.g. a compile job's engines) answers instead of raising "__spec__ is None"
    stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    ops.__spec__ = importlib.machinery.ModuleSpec("torchvision.ops", None)
    setattr(stub, _MARKER, True)
    sys.modules["torchvision"] = stub
    sys.modules["torchvision.ops"] = ops
    return True
