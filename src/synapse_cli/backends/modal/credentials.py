"""Modal credentials: where the token comes from (env or ``~/.modal.toml``), checked before any call, without importing modal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from synapse_cli.errors import BackendError


def credentials_source(env: Mapping[str, str] | None = None) -> str | None:
    """Where Modal credentials would come from, or None. No network, no modal import."""
    env = os.environ if env is None else env
    if env.get("MODAL_TOKEN_ID") and env.get("MODAL_TOKEN_SECRET"):
        return "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"
    path = Path(env.get("MODAL_CONFIG_PATH") or Path(env.get("HOME", "~")).expanduser() / ".modal.toml")
    if not path.is_file():
        return None
    import tomllib
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    wanted = env.get("MODAL_PROFILE")
    for name, profile in profiles.items():
        if not isinstance(profile, dict) or (wanted and name != wanted):
            continue
        if (wanted or profile.get("active") or len(profiles) == 1) and profile.get("token_id") and profile.get("token_secret"):
            return f"{path} [{name}]"
    return None


def require_credentials(env: Mapping[str, str] | None = None) -> str:
    source = credentials_source(env)
    if source is None:
        raise BackendError(
            "no Modal credentials: run `modal token new`, or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET "
            "(or run with --no-modal)"
        )
    return source


def _server() -> str:
    return os.environ.get("MODAL_SERVER_URL", "https://api.modal.com")
