"""Settings: flag > ``SYNAPSE_*`` environment > ``.synapse.toml`` > default.

``resolve(flags, env, file_data)`` is pure: the environment and the parsed
file come in as arguments, nothing is read at import time. Every value keeps
its source so ``synapse config show`` can say where it came from.

Every key lives in ``REGISTRY`` (synapse's own keys, then each job kind's
section from its ``JobKind`` record); the file uses TOML tables for the part before
the dot (``ffmpeg.preset`` is ``[ffmpeg] preset``), the environment joins the
parts with ``_`` (``SYNAPSE_FFMPEG_PRESET``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from synapse_cli.errors import UsageError

CONFIG_FILENAME = ".synapse.toml"
ENV_PREFIX = "SYNAPSE_"

# -- value transforms: each takes the raw value (str from env, anything from TOML) --


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v in (None, "") else _str(v)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def t(v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError("expected an integer")
        n = int(v) if isinstance(v, (int, str)) else None
        if n is None:
            raise ValueError("expected an integer")
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise ValueError(f"expected an integer in [{lo}, {hi}]")
        return n

    return t


def _float(lo: float = 0.0, strict: bool = True) -> Callable[[Any], float]:
    def t(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError("expected a number")
        x = float(v)
        if x < lo or (strict and x == lo):
            raise ValueError(f"expected a number {'>' if strict else '>='} {lo}")
        return x

    return t


def _choice(*options: str) -> Callable[[Any], str]:
    def t(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return v

    return t


def _opt_bool(v: Any) -> bool | None:
    return None if v in (None, "", "auto") else _bool(v)


def _batch(v: Any) -> int:
    """``auto`` (stored as 0) or a batch size 1-256."""
    if v == "auto":
        return 0
    try:
        return _int(1, 256)(v)
    except (TypeError, ValueError):
        raise ValueError("expected auto or an integer in [1, 256]") from None


def _list(v: Any) -> list[str]:
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        return list(v)
    raise ValueError("expected a list of strings or a comma-separated string")


def _prices(v: Any) -> dict[str, float]:
    if isinstance(v, str):  # env: "T4=0.59,A10G=1.10"
        v = dict(p.split("=", 1) for p in v.split(",") if p.strip())
    if not isinstance(v, dict):
        raise ValueError("expected a table of GPU name = USD per hour")
    return {str(k): float(x) for k, x in v.items()}


def _endpoints(v: Any) -> dict[str, str]:
    """A table of bucket = endpoint URL (env: ``"media=https://a.example,logs=http://minio:9000"``)."""
    if isinstance(v, str):
        parts = [p for p in v.split(",") if p.strip()]
        if any("=" not in p for p in parts):
            raise ValueError("expected bucket=https://endpoint,...")
        v = dict(p.split("=", 1) for p in parts)
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) and x.startswith(("https://", "http://")) for k, x in v.items()):
        raise ValueError("expected a table of bucket = \"https://endpoint\"")
    return {k.strip(): x.strip() for k, x in v.items()}


def _shards(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a number of shards or 'auto'")
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError("expected a number of shards or 'auto'") from None
    if isinstance(v, float) and v != n or n < 1 or n > 1024:
        raise ValueError("expected 1..1024 or 'auto'")
    return n


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
ENGINES = ("llguidance", "xgrammar", "outlines", "llama.cpp")


@dataclass(frozen=True)
class _Setting:
    default: Any
    transform: Callable[[Any], Any]
    help: str
    env_aliases: tuple[str, ...] = ()
    secret: bool = False  # never read from the file, masked by `config show`


_CORE: dict[str, _Setting] = {
    "backend": _Setting("local", _choice("local", "modal"), "where jobs run: local (in-process) or modal"),
    # [ffmpeg]
    "ffmpeg.path": _Setting(None, _opt_str, "ffmpeg binary; default: ffmpeg on PATH, else the imageio-ffmpeg one", ("SYNAPSE_FFMPEG",)),
    "ffmpeg.preset": _Setting("fast", _choice(*X264_PRESETS), "libx264 preset"),
    "ffmpeg.crf": _Setting(23, _int(0, 51), "libx264 constant rate factor (0-51, lower is better)"),
    "ffmpeg.threads": _Setting(0, _int(0, 256), "threads per ffmpeg decoder, filter graph and libx264 encode (per shard); 0 = ffmpeg's choice"),
    # [modal]
    "modal.app_name": _Setting("synapse", _str, "Modal app name"),
    "modal.environment": _Setting(None, _opt_str, "Modal environment; default: the profile's"),
    "modal.mode": _Setting("deployed", _choice("deployed", "ephemeral"), "deployed: look functions up by name; ephemeral: run the app for this call"),
    "modal.gpu": _Setting("T4", _str, "GPU for inference functions"),
    "modal.timeout_s": _Setting(3600, _int(1, 86400), "per-call timeout"),
    "modal.connect_timeout_s": _Setting(20.0, _float(), "the whole budget for reaching Modal: the connection, the lookups and the first calls (the client alone retries ~60 s)"),
    "modal.max_retries": _Setting(2, _int(0, 10), "retries for transient failures"),
    "modal.initial_backoff_ms": _Setting(1000, _int(0, 600_000), "first retry delay"),
    "modal.volume": _Setting("synapse-data", _str, "Volume for inputs and outputs"),
    "modal.secrets": _Setting([], _list, "Modal secret names attached to the functions"),
    # [http]: the HTTP client
    "http.endpoint": _Setting(None, _opt_str, "HTTP endpoint; when set, remote jobs go there", ("SYNAPSE_ENDPOINT",)),
    "http.timeout_s": _Setting(60.0, _float(), "HTTP connect/read timeout"),
    "http.max_retries": _Setting(3, _int(0, 10), "retries before the stream starts"),
    "http.initial_backoff_ms": _Setting(500, _int(0, 600_000), "first retry delay"),
    "api_key": _Setting(None, _opt_str, "API key for the HTTP endpoint (environment only)", secret=True),
    # [serve]
    "serve.host": _Setting("127.0.0.1", _str, "synapse serve bind address"),
    "serve.port": _Setting(8000, _int(0, 65535), "synapse serve port"),
    "serve.max_upload_mb": _Setting(2048, _int(1), "largest accepted upload"),
    "serve.work_dir": _Setting(None, _opt_str, "server work dir; default: a temp dir"),
    "serve.max_concurrent_jobs": _Setting(0, _int(0, 10_000), "jobs running (or uploading) at once, more get 429; 0 = one per core"),
    "serve.max_queued_jobs": _Setting(100, _int(0, 100_000), "detached jobs waiting for a slot (uploads included); more get 429"),
    "serve.job_timeout_s": _Setting(14400.0, _float(0.0, strict=False), "a job running longer is stopped; 0 = no limit"),
    "serve.min_free_mb": _Setting(1024, _int(0), "free disk the work dir must keep after an upload (else 507)"),
    "serve.stall_timeout_s": _Setting(60.0, _float(), "a client that stops reading the stream this long cancels its job"),
    "serve.body_timeout_s": _Setting(60.0, _float(), "an upload that sends nothing this long is refused (408)"),
    "serve.artifact_ttl_s": _Setting(3600.0, _float(), "a job's outputs are deleted this long after it ended (the server sweeps every min(60 s, this))"),
    "serve.keep_jobs_days": _Setting(30.0, _float(0.0, strict=False), "detached jobs that ended longer ago are deleted from the server's job store (record, events, files; fractions allowed); 0 = keep for ever"),
    "serve.max_key_failures": _Setting(10, _int(1, 1_000_000_000), "wrong API keys an address may send a minute; past it, 429 until the minute is over"),
    "serve.models_dir": _Setting(None, _opt_str, "models a client may name (infer model=NAME) besides the bundled default"),
    "serve.allow_hosts": _Setting([], _list, "hosts (names or IP literals) that URLs given to the server or a container may reach although they resolve to a loopback, private or link-local address"),
    # [notify]: signed webhooks (docs/webhooks.md)
    "notify.url": _Setting(None, _opt_str, "webhook URL every job POSTs its events to (--notify URL sets it per job)"),
    "notify.secret": _Setting(None, _opt_str, "webhook signing secret, whsec_<base64> (environment only)", secret=True),
    "notify.progress_interval_s": _Setting(5.0, _float(), "at most one progress webhook this often"),
    "notify.retry_for_s": _Setting(60.0, _float(0.0, strict=False), "how long a terminal webhook (finished, error, cancelled) is retried; the job waits for it"),
    "notify.allow_http": _Setting(False, _bool, "allow plain http:// webhook targets off the local backend (on it they always are)"),
    "serve.allow_buckets": _Setting([], _list, "s3:// buckets a job sent to synapse serve may read and write (with the server's credentials); others are refused (403)"),
    # [storage]: s3:// and https:// inputs and outputs (credentials only from the AWS_* environment or a Modal Secret)
    "storage.endpoint": _Setting(None, _opt_str, "S3-compatible endpoint (R2: https://<account>.r2.cloudflarestorage.com; MinIO); default: AWS_ENDPOINT_URL, else AWS"),
    "storage.endpoints": _Setting({}, _endpoints, "per-bucket endpoints (a table bucket = URL), for buckets on another S3-compatible service than storage.endpoint"),
    "storage.region": _Setting(None, _opt_str, "bucket region (R2: auto); default: AWS_REGION, else us-east-1"),
    "storage.path_style": _Setting(False, _bool, "path-style requests (endpoint/bucket/key), as MinIO and many S3-compatible servers want"),
    "storage.allow_http": _Setting(False, _bool, "allow plain http:// inputs (tests, private networks); an http:// [storage] endpoint is the operator's choice and always allowed"),
    "storage.presign_expiry_s": _Setting(21600, _int(60, 604800), "how long a presigned URL handed to ffmpeg/PyAV for a media input stays valid"),
    # [shards]
    "shards.count": _Setting("auto", _shards, "shards per job: N, or auto (1 locally; on Modal, by size)"),
    "shards.seconds": _Setting(60.0, _float(), "auto: media seconds per shard (export, infer)"),
    "shards.units": _Setting(64, _int(1), "auto: compile inputs per shard"),
    "shards.max": _Setting(32, _int(1, 1024), "auto: at most this many shards"),
    "shards.track_overlap_s": _Setting(1.0, _float(), "infer track: seconds each shard starts early, to stitch track ids"),
    # [jobs]
    "jobs.db": _Setting(None, _opt_str, "job store (SQLite); default: the user data dir"),
    "jobs.gpu_prices_usd_per_hour": _Setting({"T4": 0.59, "L4": 0.80, "A10G": 1.10, "A100": 2.10, "H100": 3.95, "CPU": 0.0}, _prices, "per-GPU price table for cost estimates"),
}


# What a job kind's record uses to declare its ``[<kind>]`` section (see synapse_cli.jobs.JobKind).
Setting, text, optional_text, boolean, integer, number, choice, string_list = _Setting, _str, _opt_str, _bool, _int, _float, _choice, _list
optional_boolean, batch_size = _opt_bool, _batch


# Keys that were renamed: the old name still works, with a one-line warning on stderr naming the new one.
RENAMED = {"modal.endpoint": "http.endpoint"}


def _renamed_in(layer: Mapping[str, Any], where: str, notes: list[str]) -> dict[str, Any]:
    """``layer`` with renamed keys under their new names (the new name wins where both are given)."""
    out = dict(layer)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            if value is None:  # a flag not given
                continue
            notes.append(f"warning: {old} is deprecated{where}; use {new} ([{new.split('.')[0]}] {new.split('.', 1)[1]})")
            if out.get(new) is None:
                out[new] = value
    return out


def registry() -> dict[str, _Setting]:
    """Every setting: synapse's own, then each job kind's ``[<kind>]`` section (from its ``JobKind`` record)."""
    from synapse_cli.jobs import JOBS

    out = dict(_CORE)
    for kind in JOBS.values():
        out.update({f"{kind.name}.{key}": setting for key, setting in kind.settings.items()})
    return out


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":  # built on use: the kinds' records import this module for Setting
        return registry()
    raise AttributeError(name)


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


@dataclass(frozen=True)
class Value:
    value: Any
    source: str  # "flag" | "env:NAME" | "file:PATH" | "default"


class Settings(Mapping[str, Any]):
    """Resolved settings: ``settings["ffmpeg.crf"]``; ``settings.source(key)`` says where it came from."""

    def __init__(self, values: dict[str, Value], config_path: Path | None = None, warnings: tuple[str, ...] = ()) -> None:
        self._values = values
        self.config_path = config_path
        self.warnings = warnings  # deprecated keys given; load_settings prints them

    def __getitem__(self, key: str) -> Any:
        return self._values[RENAMED.get(key, key)].value

    def __contains__(self, key: object) -> bool:
        return key in self._values  # an old name reads its setting, but is not one

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def source(self, key: str) -> str:
        return self._values[RENAMED.get(key, key)].source

    def report(self) -> dict[str, Any]:
        """What ``config show --json`` prints: the file, then each key's value (secrets masked) and source."""
        registry_ = registry()
        rows = {
            k: {"value": "***" if k in registry_ and registry_[k].secret and v.value else v.value, "source": v.source}
            for k, v in self._values.items()
        }
        return {"config_file": str(self.config_path) if self.config_path else None, "settings": rows}

    def section(self, name: str) -> dict[str, Any]:
        """``section("modal")`` -> ``{"app_name": ..., ...}``."""
        return {k.split(".", 1)[1]: v.value for k, v in self._values.items() if k.startswith(name + ".")}


def resolve(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file_data: Mapping[str, Any] | None = None,
    file_path: Path | str | None = None,
) -> Settings:
    """Merge the four layers. ``flags`` values of None mean "not given". Bad values raise UsageError."""
    notes: list[str] = []
    flags = _renamed_in(flags or {}, "", notes)
    file_data = _renamed_in(file_data or {}, f" in {file_path}" if file_path else "", notes)
    env = env or {}
    registry_ = registry()
    unknown = [k for k in list(flags) + list(file_data) if k not in registry_]
    if unknown:
        where = f" in {file_path}" if file_path and unknown[0] in file_data else ""
        raise UsageError(f"unknown config key {unknown[0]!r}{where}")
    values: dict[str, Value] = {}
    for key, setting in registry_.items():
        old_names = tuple(env_name(old) for old, new in RENAMED.items() if new == key)
        names = (env_name(key),) + setting.env_aliases + old_names
        env_hit = next((n for n in names if env.get(n) not in (None, "")), None)
        if env_hit in old_names and flags.get(key) is None:
            notes.append(f"warning: {env_hit} is deprecated; use {env_name(key)}")
        if flags.get(key) is not None:
            raw, source = flags[key], "flag"
        elif env_hit:
            raw, source = env[env_hit], f"env:{env_hit}"
        elif key in file_data:
            if setting.secret:
                raise UsageError(f"{key} is a secret: set {env_name(key)} in the environment, not in {file_path}")
            raw, source = file_data[key], f"file:{file_path}"
        else:
            values[key] = Value(setting.default, "default")
            continue
        try:
            values[key] = Value(setting.transform(raw), source)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"bad value for {key}: {raw!r} (from {source}): {exc}") from None
    return Settings(values, Path(file_path) if file_path else None, tuple(notes))


# -- the file --------------------------------------------------------------------


def find_config(start: Path) -> Path | None:
    """The nearest ``.synapse.toml`` from ``start`` upward."""
    for folder in (start, *start.parents):
        candidate = folder / CONFIG_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _flatten(data: Mapping[str, Any], prefix: str = "", registry_: Mapping[str, _Setting] | None = None) -> dict[str, Any]:
    registry_ = registry() if registry_ is None else registry_
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        # a table is a section unless the key itself takes a table (e.g. the price table)
        if isinstance(v, dict) and key not in registry_:
            out.update(_flatten(v, key + ".", registry_))
        else:
            out[key] = v
    return out


def load_file(path: Path, profile: str | None = None) -> dict[str, Any]:
    """Parse and flatten a config file; ``[profile.NAME]`` tables overlay the top level."""
    import tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"bad TOML in {path}: {exc}") from None
    profiles = data.pop("profile", {})
    flat = _flatten(data)
    if profile:
        if profile not in profiles:
            raise UsageError(f"profile {profile!r} not found in {path}")
        flat.update(_flatten(profiles[profile]))
    return flat


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_path: Path | str | None = None,
    profile: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """The impure wrapper commands use: find the file, read it, resolve."""
    env = os.environ if env is None else env
    profile = profile or env.get("SYNAPSE_PROFILE")
    explicit = config_path or env.get("SYNAPSE_CONFIG")
    if explicit:
        given = Path(explicit)
        if not given.is_file():
            raise UsageError(f"config file not found: {given}")
        path: Path | None = given
    else:
        path = find_config(cwd or Path.cwd())
    if profile and not path:
        raise UsageError(f"profile {profile!r} given but no {CONFIG_FILENAME} found")
    data = load_file(path, profile) if path else {}
    settings = resolve(flags, env, data, path)
    for note in settings.warnings:
        print(note, file=sys.stderr)
    return settings
