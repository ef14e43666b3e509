"""An export job's params: one plain dataclass per job, read in pure Python or, when in doubt, by pydantic."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Optional, Union

from synapse_cli.errors import UsageError

EXPORT_JOBS = ("framing", "overlay", "annotate")


# Each job's params are a plain dataclass. A field's constraints are a _Bound (pydantic's
# own names: ge, gt, le, min_length, max_length, pattern), its own rule a _Check, and a
# class's rule its ``check`` method. That one declaration has two readers:
# - _read, in pure Python, for params a command line or a JSON file plainly gets right (JSON
#   numbers, strings, lists and objects with known keys, within bounds). Importing pydantic
#   would be most of a short export's start-up.
# - pydantic, for everything else (_model builds its models from the same declaration, once
#   needed): it words the error, naming the field, or applies its lax coercions ("810" for
#   810), and _read then builds the dataclass from what it returns.


class _Bound:
    """Constraints of one field, as pydantic-core's schema keys: pydantic checks and words them itself."""

    def __init__(self, **constraints: Any) -> None:
        self.constraints = constraints

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        return {**handler(source), **self.constraints}

    KNOWN = frozenset({"ge", "gt", "le", "lt", "min_length", "max_length", "pattern"})  # what admits() can check

    def admits(self, value: Any) -> bool:
        """Does ``value`` meet every constraint? False for a constraint this reader does not know: pydantic then decides."""
        c = self.constraints
        if not c.keys() <= self.KNOWN:
            return False
        if "ge" in c and not value >= c["ge"] or "gt" in c and not value > c["gt"] or "le" in c and not value <= c["le"] or "lt" in c and not value < c["lt"]:
            return False
        if "min_length" in c and len(value) < c["min_length"] or "max_length" in c and len(value) > c["max_length"]:
            return False
        # pydantic matches a pattern anywhere (anchor it); Python's $ would also match before a last newline
        return "pattern" not in c or ("\n" not in value and re.search(c["pattern"], value) is not None)


class _Check:
    """A field's own rule: ``func(value)`` returns the value to keep, or raises ValueError."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.func, handler(source))


def _interp(value: str) -> str:
    value = value.replace("_", "-").lower()
    if value not in ("linear", "catmull-rom"):
        raise ValueError("expected 'linear' or 'catmull-rom'")
    return value


def _even(v: int) -> int:
    if v % 2:
        raise ValueError("must be even (H.264 with 4:2:0 chroma)")
    return v


Interpolation = Annotated[str, _Check(_interp)]
OutputSide = Annotated[int, _Bound(ge=16, le=7680), _Check(_even)]


@dataclass
class CropKeyframe:
    time: Annotated[float, _Bound(ge=0)]
    x: float
    y: float
    width: Annotated[float, _Bound(gt=0)]
    height: Annotated[float, _Bound(gt=0)]


@dataclass
class Segment:
    start: Annotated[float, _Bound(ge=0)]
    end: Annotated[float, _Bound(gt=0)]
    speed: Annotated[float, _Bound(ge=0.1, le=10)] = 1.0

    def check(self) -> None:
        if self.end <= self.start:
            raise ValueError("end must be after start")


@dataclass
class FramingParams:
    keyframes: list[CropKeyframe] = field(default_factory=list)
    interpolation: Interpolation = "linear"
    rotate: float = 0.0
    output_width: OutputSide = 810
    output_height: OutputSide = 1440
    segments: list[Segment] = field(default_factory=list)


@dataclass
class EllipseKeyframe:
    time: Annotated[float, _Bound(ge=0)]
    x: float
    y: float
    radius_x: Annotated[float, _Bound(gt=0)]
    radius_y: Annotated[float, _Bound(gt=0)]


_COLOR = r"^(#?[0-9a-fA-F]{6}|[A-Za-z]+)(@(0(\.\d+)?|1(\.0+)?))?$"


@dataclass
class OverlayParams:
    keyframes: Annotated[list[EllipseKeyframe], _Bound(min_length=1)]
    effect: Literal["dark_overlay", "brightness_boost", "original"] = "dark_overlay"
    interpolation: Interpolation = "linear"
    start: Optional[Annotated[float, _Bound(ge=0)]] = None
    end: Optional[Annotated[float, _Bound(gt=0)]] = None
    fade_s: Annotated[float, _Bound(ge=0, le=5)] = 0.25
    dim: Annotated[float, _Bound(ge=0, le=1)] = 0.6
    boost: Annotated[float, _Bound(ge=0, le=2)] = 0.35
    stroke_color: Annotated[str, _Bound(pattern=_COLOR)] = "white"
    stroke_width: Annotated[float, _Bound(ge=0, le=100)] = 4.0
    text: Optional[Annotated[str, _Bound(max_length=500)]] = None





@dataclass
class Clip:
    start: Annotated[float, _Bound(ge=0)]
    end: Annotated[float, _Bound(gt=0)]
    title: Annotated[str, _Bound(max_length=200)] = ""
    notes: Annotated[str, _Bound(max_length=1000)] = ""
    rating: Optional[Literal["!!", "!", "!?", "?", "??"]] = None

    def check(self) -> None:
        if self.end <= self.start:
            raise ValueError("end must be after start")


@dataclass
class AnnotateParams:
    clips: Annotated[list[Clip], _Bound(min_length=1)]
    border: Annotated[int, _Bound(ge=0, le=200)] = 12


PARAMS: dict[str, type] = {"framing": FramingParams, "overlay": OverlayParams, "annotate": AnnotateParams}


class _Doubt(Exception):
    """_read cannot vouch for a value: pydantic decides."""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _read(tp: Any, value: Any, check: bool = True) -> Any:
    """``value`` as ``tp``: with ``check``, only a plainly valid value (else _Doubt); without, one pydantic has validated."""
    meta: tuple[Any, ...] = ()
    if typing.get_origin(tp) is Annotated:
        tp, *rest = typing.get_args(tp)
        meta = tuple(rest)
    origin = typing.get_origin(tp)
    if origin is Union:
        if value is None:
            return None
        (tp,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return _read(tp, value, check)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        out = _read_object(tp, value, check)
    elif origin is list:
        if check and type(value) is not list:
            raise _Doubt
        (item,) = typing.get_args(tp)
        out = [_read(item, v, check) for v in value]
    elif not check:
        return value
    else:
        out = _read_scalar(tp, origin, value)
    for m in meta if check else ():
        if isinstance(m, _Check):
            try:
                out = m.func(out)
            except ValueError:
                raise _Doubt from None
        elif not (isinstance(m, _Bound) and m.admits(out)):
            raise _Doubt
    return out


def _read_scalar(tp: Any, origin: Any, value: Any) -> Any:
    """A plainly valid literal, float, int or str as ``tp``, else _Doubt."""
    if origin is Literal:
        if type(value) is not str or value not in typing.get_args(tp):
            raise _Doubt
        return value
    if tp is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _Doubt
        return float(value)
    if tp in (int, str) and type(value) is tp:
        return value
    raise _Doubt


def _read_object(cls: type, value: Any, check: bool) -> Any:
    if check and (type(value) is not dict or not set(value) <= set(_hints(cls))):
        raise _Doubt
    hints, kwargs = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = _read(hints[f.name], value[f.name], check)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Doubt
    obj = cls(**kwargs)
    if check and hasattr(obj, "check"):
        try:
            obj.check()
        except ValueError:
            raise _Doubt from None
    return obj


@functools.lru_cache(maxsize=None)
def _model(cls: type) -> Any:
    """The pydantic model of a params dataclass (extra keys forbidden), for the params _read cannot vouch for."""
    from pydantic import ConfigDict, create_model, model_validator

    def swap(tp: Any) -> Any:  # nested dataclasses become their models
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return _model(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            return Annotated[(swap(args[0]), *tp.__metadata__)]  # type: ignore[valid-type]  # built at run time
        if origin is list:
            return list[swap(args[0])]  # type: ignore[misc]  # built at run time
        if origin is Union:
            return Union[tuple(swap(a) for a in args)]
        return tp

    fields_ = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
        fields_[f.name] = (swap(_hints(cls)[f.name]), default)
    validators = {}
    if hasattr(cls, "check"):

        def after(self: Any) -> Any:
            cls.check(self)
            return self

        validators["check_"] = model_validator(mode="after")(after)
    return create_model(cls.__name__, __config__=ConfigDict(extra="forbid"), __validators__=validators, **fields_)  # type: ignore[call-overload]  # fields built at run time


def validate_params(job: str, params: dict[str, Any]) -> Any:
    """Typed params for ``job``, or a one-line UsageError naming the bad field."""
    if job not in PARAMS:
        raise UsageError(f"unknown export job {job!r}; expected one of {', '.join(EXPORT_JOBS)}")
    try:
        return _read(PARAMS[job], params)
    except _Doubt:
        return _validate_with_pydantic(job, params)


def _validate_with_pydantic(job: str, params: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    try:
        model = _model(PARAMS[job]).model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "params" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        value = f" (got {err['input']!r:.60})" if err.get("type") not in ("missing",) and "input" in err else ""
        raise UsageError(f"{job}: {where}: {err['msg']}{value}") from None
    return _read(PARAMS[job], model.model_dump(), check=False)
