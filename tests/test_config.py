from __future__ import annotations

import json
from pathlib import Path

import pytest

from synapse_cli.config import REGISTRY, env_name, load_file, resolve
from synapse_cli.errors import UsageError

F = "/repo/.synapse.toml"


@pytest.mark.parametrize(
    "flags, env, file_data, expected, source",
    [
        ({}, {}, {}, "fast", "default"),
        ({}, {}, {"ffmpeg.preset": "slow"}, "slow", f"file:{F}"),
        ({}, {"SYNAPSE_FFMPEG_PRESET": "veryfast"}, {"ffmpeg.preset": "slow"}, "veryfast", "env:SYNAPSE_FFMPEG_PRESET"),
        ({"ffmpeg.preset": "medium"}, {"SYNAPSE_FFMPEG_PRESET": "veryfast"}, {"ffmpeg.preset": "slow"}, "medium", "flag"),
        ({"ffmpeg.preset": None}, {"SYNAPSE_FFMPEG_PRESET": "veryfast"}, {}, "veryfast", "env:SYNAPSE_FFMPEG_PRESET"),  # None = not given
        ({}, {"SYNAPSE_FFMPEG_PRESET": ""}, {"ffmpeg.preset": "slow"}, "slow", f"file:{F}"),  # empty env = unset
    ],
)
def test_precedence_flag_env_file_default(flags, env, file_data, expected, source):
    settings = resolve(flags, env, file_data, F)
    assert settings["ffmpeg.preset"] == expected
    assert settings.source("ffmpeg.preset") == source


def test_env_aliases_and_types():
    s = resolve({}, {"SYNAPSE_FFMPEG": "/opt/ffmpeg", "SYNAPSE_FFMPEG_CRF": "18", "SYNAPSE_COMPILE_ENGINES": "llguidance, outlines"}, {})
    assert s["ffmpeg.path"] == "/opt/ffmpeg" and s.source("ffmpeg.path") == "env:SYNAPSE_FFMPEG"
    assert s["ffmpeg.crf"] == 18
    assert s["compile.engines"] == ["llguidance", "outlines"]


@pytest.mark.parametrize(
    "flags, env, file_data, message",
    [
        ({}, {}, {"ffmpeg.colour": "red"}, f"unknown config key 'ffmpeg.colour' in {F}"),
        ({}, {}, {"ffmpeg.crf": 99}, f"bad value for ffmpeg.crf: 99 (from file:{F})"),
        ({}, {"SYNAPSE_BACKEND": "cloud"}, {}, "bad value for backend: 'cloud' (from env:SYNAPSE_BACKEND)"),
        ({}, {}, {"api_key": "sk-123"}, "api_key is a secret"),
    ],
)
def test_bad_values_name_key_value_and_source(flags, env, file_data, message):
    with pytest.raises(UsageError) as info:
        resolve(flags, env, file_data, F)
    assert message in str(info.value)


def test_file_tables_flatten_and_profiles_overlay(tmp_path):
    path = tmp_path / ".synapse.toml"
    path.write_text('backend = "local"\n[ffmpeg]\npreset = "slow"\n[profile.ci.ffmpeg]\npreset = "ultrafast"\n')
    assert load_file(path) == {"backend": "local", "ffmpeg.preset": "slow"}
    assert load_file(path, "ci")["ffmpeg.preset"] == "ultrafast"
    with pytest.raises(UsageError, match="profile 'gpu' not found"):
        load_file(path, "gpu")


def test_example_file_documents_every_key_and_parses(tmp_path):
    from pathlib import Path

    import re
    import tomllib

    example = Path(__file__).resolve().parent.parent / ".synapse.toml.example"
    text = example.read_text()
    data = load_file(example)
    resolve({}, {}, data, example)  # every value in the example is valid
    # Each key is documented in its own section: set there, or shown commented out there as
    # `# leaf = value` / `# leaf: what it is`. A key of the same name in another section does not count.
    parsed = tomllib.loads(text)
    blocks = re.split(r"^\[([^\]]+)\]\s*$", text, flags=re.M)  # [top, name1, body1, name2, body2, ...]
    sections = {"": blocks[0], **dict(zip(blocks[1::2], blocks[2::2]))}
    commented = {name: set(re.findall(r"^#\s*([a-z_]+)\s*[=:]", body, flags=re.M)) for name, body in sections.items()}
    secrets = {k for k, setting in REGISTRY.items() if setting.secret}  # never in the file: the top block names their environment variables
    for key in REGISTRY:
        section, _, leaf = key.rpartition(".")
        table = parsed.get(section, {}) if section else parsed
        if key in secrets:
            assert f"({leaf})" in sections[""] and env_name(key) in sections[""], key
            continue
        assert leaf in table or leaf in commented[section], f"{key} is not documented in [{section}] of .synapse.toml.example"
        uncommented = re.search(rf"^#\s*{leaf}\s*=\s*(.+)$", sections[section], flags=re.M)
        if leaf not in table and uncommented:  # a commented-out example value must be a valid value too
            value = tomllib.loads(f"v = {uncommented.group(1)}")["v"]
            resolve({}, {}, {key: value}, example)
    # and nothing in the example is set under a name the registry does not know
    for section, table in parsed.items():
        if section == "profile" or not isinstance(table, dict):
            continue
        for leaf in table:
            assert f"{section}.{leaf}" in REGISTRY, f"[{section}] {leaf} is not a setting"


def test_config_show_reports_sources(cli, tmp_path, monkeypatch):
    (tmp_path / ".synapse.toml").write_text("[ffmpeg]\ncrf = 20\n")
    monkeypatch.chdir(tmp_path)
    run = cli("config", "show", "--json", env={"SYNAPSE_BACKEND": "local", "SYNAPSE_API_KEY": "sk-secret"})
    assert run.exit_code == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["config_file"] == str(tmp_path / ".synapse.toml")
    rows = data["settings"]
    assert rows["ffmpeg.crf"] == {"value": 20, "source": f"file:{tmp_path / '.synapse.toml'}"}
    assert rows["backend"]["source"] == "env:SYNAPSE_BACKEND"
    assert rows["ffmpeg.preset"]["source"] == "default"
    assert rows["api_key"]["value"] == "***" and "sk-secret" not in run.stdout
    human = cli("config", "show")
    assert "ffmpeg.crf" in human.stdout and "file:" in human.stdout


def test_explicit_config_flag_and_env(cli, tmp_path):
    cfg = tmp_path / "other.toml"
    cfg.write_text('[ffmpeg]\npreset = "slow"\n')
    for args, env in ((["--config", cfg], None), ([], {"SYNAPSE_CONFIG": str(cfg)})):
        run = cli("config", "show", "--json", *args, env=env)
        assert json.loads(run.stdout)["settings"]["ffmpeg.preset"]["value"] == "slow"
    missing = cli("config", "show", "--config", tmp_path / "none.toml")
    assert missing.exit_code == 2 and "config file not found" in missing.stderr


def test_config_and_profile_flags_beat_their_environment_variables(cli, tmp_path):
    """--config > SYNAPSE_CONFIG > .synapse.toml found from here; --profile > SYNAPSE_PROFILE; env > any file."""
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[ffmpeg]\npreset = "slow"\n[profile.ci.ffmpeg]\npreset = "veryfast"\n')
    b.write_text('[ffmpeg]\npreset = "medium"\n[profile.ci.ffmpeg]\npreset = "ultrafast"\n[profile.gpu.ffmpeg]\npreset = "faster"\n')
    Path(".synapse.toml").write_text('[ffmpeg]\npreset = "veryslow"\n')  # found from the working directory

    def shown(*args, **env):
        run = cli("config", "show", "--json", *args, env=env or None)
        assert run.exit_code == 0, run.stderr
        data = json.loads(run.stdout)
        return data["config_file"], data["settings"]["ffmpeg.preset"]["value"]

    assert shown() == (str(Path(".synapse.toml").resolve()), "veryslow")
    assert shown(SYNAPSE_CONFIG=str(b)) == (str(b), "medium")
    assert shown("--config", a, SYNAPSE_CONFIG=str(b)) == (str(a), "slow")
    assert shown("--config", a, "--profile", "ci", SYNAPSE_CONFIG=str(b), SYNAPSE_PROFILE="gpu") == (str(a), "veryfast")
    assert shown(SYNAPSE_CONFIG=str(b), SYNAPSE_PROFILE="gpu") == (str(b), "faster")
    assert shown("--profile", "ci", SYNAPSE_CONFIG=str(b), SYNAPSE_PROFILE="gpu") == (str(b), "ultrafast")
    assert shown("--config", a, "--profile", "ci", SYNAPSE_FFMPEG_PRESET="superfast") == (str(a), "superfast")
    missing = cli("config", "show", "--config", a, env={"SYNAPSE_PROFILE": "gpu"})  # a has no [profile.gpu]
    assert missing.exit_code == 2 and "profile 'gpu' not found" in missing.stderr


def test_env_names():
    assert env_name("ffmpeg.preset") == "SYNAPSE_FFMPEG_PRESET"
    assert env_name("modal.initial_backoff_ms") == "SYNAPSE_MODAL_INITIAL_BACKOFF_MS"


@pytest.mark.parametrize(
    "flags, env, file_data, value, source, warning",
    [
        ({}, {"SYNAPSE_ENDPOINT": "http://e"}, {}, "http://e", "env:SYNAPSE_ENDPOINT", None),
        ({}, {"SYNAPSE_HTTP_ENDPOINT": "http://e"}, {}, "http://e", "env:SYNAPSE_HTTP_ENDPOINT", None),
        ({}, {}, {"http.endpoint": "http://f"}, "http://f", f"file:{F}", None),
        ({}, {}, {"modal.endpoint": "http://f"}, "http://f", f"file:{F}", f"warning: modal.endpoint is deprecated in {F}; use http.endpoint ([http] endpoint)"),
        ({}, {}, {"modal.endpoint": "http://old", "http.endpoint": "http://new"}, "http://new", f"file:{F}", f"warning: modal.endpoint is deprecated in {F}; use http.endpoint ([http] endpoint)"),
        ({}, {"SYNAPSE_MODAL_ENDPOINT": "http://e"}, {}, "http://e", "env:SYNAPSE_MODAL_ENDPOINT", "warning: SYNAPSE_MODAL_ENDPOINT is deprecated; use SYNAPSE_HTTP_ENDPOINT"),
        ({"modal.endpoint": "http://x"}, {}, {}, "http://x", "flag", "warning: modal.endpoint is deprecated; use http.endpoint ([http] endpoint)"),
        ({"http.endpoint": None}, {}, {}, None, "default", None),
    ],
)
def test_http_endpoint_and_its_old_name(flags, env, file_data, value, source, warning):
    settings = resolve(flags, env, file_data, F)
    assert settings["http.endpoint"] == value and settings.source("http.endpoint") == source
    assert settings["modal.endpoint"] == value  # the old name still reads the setting
    assert list(settings.warnings) == ([warning] if warning else [])
    assert "modal.endpoint" not in settings and "endpoint" not in settings.section("modal")
