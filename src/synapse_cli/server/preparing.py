"""Preparing a job behind the endpoint: its spec checked and pointed at the job's folder (uploads in,
outputs out), and a queued detached job's prepared run saved to that folder and read back by a restarted server."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from synapse_cli.backends._remote import PathField, path_fields, stage_paths
from synapse_cli.errors import SynapseError, UsageError
from synapse_cli.jobs import get_kind, select_installed, settle_names
from synapse_cli.server.runner import JobRun, Output
from synapse_cli.server.uploads import BadUpload, Body, installed_upload_refused, is_within, safe_filename
from synapse_cli.server.urls import check_urls


@lru_cache(maxsize=None)
def _adapter(cls: type) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def _check_types(kind: str, cls: type, data: dict[str, Any]) -> Any:
    """Build the spec, checking each field's type against the dataclass annotations (422 naming the field)."""
    from pydantic import ValidationError

    try:
        adapter = _adapter(cls)
    except Exception:  # a spec pydantic cannot describe: fall back to the plain constructor
        try:
            return cls(**data)
        except TypeError as exc:
            raise BadUpload(422, f"bad {kind} spec: {exc}") from None
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise BadUpload(422, f"bad {kind} spec: {where}: {err['msg']}") from None


def prepare(kind: str, body: Body, job_dir: Path, job_id: str, models_dir: str | Path | None = None, storage: Any = None) -> JobRun:
    """Check the spec and point its INPUTS at the uploaded files and its OUTPUTS into ``job_dir/out``.

    ``INSTALLED`` fields (infer's ``model``) name a model the server's owner installed
    (the bundled default, or a file in ``models_dir``); an uploaded model file is refused.
    A field that is a URL needs no file part: ``check_urls`` vets it now, and ``storage`` reads or
    writes it when the job runs (``synapse_cli.storage.staging``).
    """
    from synapse_cli.storage.urls import is_url
    from synapse_cli.jobs import spec_class

    try:
        cls = spec_class(kind)
    except ImportError as exc:
        raise BadUpload(404, f"job kind {kind!r} is not available on this server ({exc})") from None
    data = dict(body.spec)
    notify_url = data.pop("notify", None)  # not a field of the kind's spec: the job's webhook target (synapse_cli.notify)
    if notify_url is not None and (not isinstance(notify_url, str) or not notify_url):
        raise BadUpload(422, "bad notify: expected a URL (https://…) or null")
    names = {f.name: f for f in fields(cls)}
    extra = sorted(set(data) - set(names))
    if extra:
        raise BadUpload(422, f"unknown {kind} spec field(s): {', '.join(extra)}")
    inputs: tuple[str, ...] = tuple(getattr(cls, "INPUTS", ()))
    outputs: tuple[str, ...] = tuple(getattr(cls, "OUTPUTS", ()))
    refused = sorted({u.field for u in body.files} & set(get_kind(kind).installed))
    if refused:
        raise installed_upload_refused(kind, refused)
    stray = sorted({u.field for u in body.files} - set(inputs))
    if stray:
        raise BadUpload(400, f"file part(s) {', '.join(map(repr, stray))} are not inputs of {kind} (inputs: {', '.join(inputs) or 'none'})")

    try:  # the outputs a spec leaves out get the CLI's names, derived from the inputs' (the kind's names hook)
        data = settle_names(kind, data)
    except UsageError as exc:
        raise BadUpload(422, f"bad {kind} spec: {exc}") from None
    # the spec as sent, with those names: what a detached job's record calls its artifacts
    body.spec = {**body.spec, **{name: data[name] for name in outputs if data.get(name) is not None}}
    try:
        paths = path_fields(kind, data)
    except UsageError as exc:
        raise BadUpload(422, f"{kind} {exc}") from None
    for name in inputs:  # each input path has its file part, in order
        parts = [u for u in body.files if u.field == name]
        listed = [p for p in paths if p.field == name]
        if data.get(name) is None and parts:
            raise BadUpload(422, f"a file was uploaded for {name!r} but the spec's {name} is null")
        if isinstance(data.get(name), str) and is_url(data[name]):
            if parts:
                raise BadUpload(422, f"{kind} input {name!r} is a URL; a file part was uploaded for it too")
            continue
        if isinstance(data.get(name), str) and len(parts) != 1:
            raise BadUpload(422, f"{kind} input {name!r} needs exactly one file part named {name!r} (got {len(parts)})")
        if isinstance(data.get(name), list) and len(parts) != len(listed):
            raise BadUpload(422, f"{kind} input {name!r} lists {len(listed)} path(s) but {len(parts)} file part(s) came")

    replacements: list[tuple[str, str]] = []
    outs: list[Output] = []

    def place(path: PathField) -> str:
        """An input: its uploaded file; an output: a file (or folder) of its own under ``out/``."""
        if not path.output:
            server = str([u for u in body.files if u.field == path.field][path.index or 0].path)
        else:
            folder = job_dir / "out" / str(len(outs))
            folder.mkdir(parents=True)
            try:
                base = safe_filename(Path(path.value).name)
            except BadUpload:
                base = "output" + Path(path.value).suffix
            outs.append(Output(path.field, path.index, folder / base, path.value))
            server = str(outs[-1].server_path)
            # the job writes a temporary sibling first (jobs._files.atomic_output): a message naming it
            # names the client's folder, as a local run's would
            parent = str(Path(path.value).parent)
            replacements.append((f"{folder}/", "" if parent == "." else parent.rstrip("/") + "/"))
        replacements.append((server, path.value))
        return server

    data = stage_paths(kind, data, place)

    # host fields (a binary, a cache dir) mean nothing here, and obeying them would let a
    # client pick a binary or a folder on the server: the spec's default applies
    for name in get_kind(kind).host_fields:
        if name in names and name not in inputs and name not in outputs:
            data.pop(name, None)  # the spec's default: whatever this server has
    try:
        data = select_installed(kind, data, models_dir)
    except SynapseError as exc:
        raise BadUpload(422, str(exc)) from None
    spec = _check_types(kind, cls, data)
    for name, cap in getattr(cls, "SERVER_CAPS", {}).items():
        value = getattr(spec, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            raise BadUpload(422, f"bad {kind} spec: {name}: {value:g} is over this server's cap of {cap:g}")
    check_urls(kind, asdict(spec), storage)
    replacements.sort(key=lambda r: len(r[0]), reverse=True)
    return JobRun(job_id, kind, job_dir, spec, outs, [u.path for u in body.files], replacements, notify_url=notify_url, storage=storage)


RUN_FILE = "run.json"  # a queued detached job's prepared run: a server restarted on the work dir starts it


def save_run(run: JobRun) -> None:
    """Write what ``restore_run`` needs into the job's folder (temp file, then renamed)."""
    from dataclasses import asdict

    data = {"kind": run.kind, "spec": asdict(run.spec), "shards": run.shards,
            "outputs": [[o.field, o.index, str(o.server_path), o.client_path] for o in run.outputs],
            "uploads": [str(p) for p in run.uploads], "replacements": [list(r) for r in run.replacements]}
    tmp = run.dir / f".{RUN_FILE}.part"
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, run.dir / RUN_FILE)


def restore_run(job_id: str, job_dir: Path) -> JobRun:
    """The run ``save_run`` wrote, checked again (a spec the kind no longer accepts raises BadUpload);
    OSError or ValueError when the file is missing or unreadable."""
    from synapse_cli.jobs import spec_class

    data = json.loads((job_dir / RUN_FILE).read_text())
    kind = data["kind"]
    for path in [*data["uploads"], *(o[2] for o in data["outputs"])]:
        if not is_within(Path(path), job_dir):
            raise ValueError(f"{RUN_FILE} names {path!r}, outside the job's folder")
    try:
        cls = spec_class(kind)
    except ImportError as exc:
        raise BadUpload(404, f"job kind {kind!r} is not available on this server ({exc})") from None
    spec = _check_types(kind, cls, data["spec"])
    run = JobRun(job_id, kind, job_dir, spec, [Output(f, i, Path(p), c) for f, i, p, c in data["outputs"]],
                 [Path(p) for p in data["uploads"]], [(a, b) for a, b in data["replacements"]])
    run.shards = int(data.get("shards", 1))
    return run
