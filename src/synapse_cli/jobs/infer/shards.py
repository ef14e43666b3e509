"""Sharded infer: contiguous frame ranges of a video, merged into one results file.

``detect`` and ``pose`` are frame-independent: each shard writes its own frames and
the merge concatenates them, so the merged file equals an unsharded one frame for
frame. ``track`` ids are local to a tracker, so every shard but the first starts
``[shards] track_overlap_s`` early: those lead-in frames are tracked and written with
``"lead_in": true``, and the merge matches their boxes against the previous shard's
boxes on the same frames (IoU, optimal assignment with ``lap``), so a person seen
across a boundary keeps one id. ``tracks`` is recomputed after stitching.
An ``--annotated`` video comes back in video-only pieces, joined by stream copy with
the source's audio added once.

Shard pieces are always ``.jsonl`` (read line by line: memory does not grow with the
video), whatever the final results file is.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from synapse_cli.events import Artifact, Event, Finished

MATCH_IOU = 0.3  # boxes of one person on one frame, seen by two trackers, overlap far more than this


def infer_seconds(spec: Any) -> float:
    """The video's length: what ``--shards auto`` divides (0 for images: they do not shard)."""
    from synapse_cli.jobs.infer.sources import inspect_source

    info = inspect_source(spec.source)
    return float(info.duration or 0.0) if info.kind == "video" else 0.0


def split_infer(spec: Any, n: int, workdir: Path, settings: Any = None) -> list[Any]:
    """Up to ``n`` shards over contiguous frame ranges of a video (an image or a folder runs whole)."""
    from synapse_cli.jobs.infer.sources import inspect_source

    overlap_s = float(settings["shards.track_overlap_s"]) if settings is not None else 1.0
    info = inspect_source(spec.source)
    if info.kind != "video" or info.frames < 2 * n:
        return [spec]
    marks = sorted({round(info.frames * k / n) for k in range(n + 1)})
    lead = int(round(overlap_s * (info.fps or 25.0))) if spec.task == "track" else 0
    parts = []
    for i, (a, b) in enumerate(zip(marks, marks[1:])):
        last = i == len(marks) - 2
        parts.append(
            replace(
                spec,
                part=[a, 2**31 - 1 if last else b],  # the last shard reads to the end, however many frames the probe estimated
                lead_in=lead if i else 0,
                output=str(workdir / f"part{i:03d}.jsonl"),
                annotated=str(workdir / f"part{i:03d}.mp4") if spec.annotated else None,
                overwrite=True,
            )
        )
    return parts


def _read(path: str) -> tuple[dict[str, Any], Iterator[dict[str, Any]], dict[str, Any]]:
    """A piece: (header, frames, tail); frames are read lazily, the tail is filled when they are exhausted."""
    f = open(path, encoding="utf-8")
    header = json.loads(f.readline())
    tail: dict[str, Any] = {}

    def frames() -> Iterator[dict[str, Any]]:
        with f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if "frame" not in row:
                    tail.update(row)
                    continue
                yield row

    return header, frames(), tail


def _iou(a: list[float], b: list[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _votes(before: list[dict[str, Any]], after: list[dict[str, Any]], votes: Counter) -> None:
    """One frame seen by two trackers: pair their boxes (optimal assignment on 1 − IoU) and count id pairs."""
    import lap
    import numpy as np

    a = [d for d in before if d.get("track_id") is not None]
    b = [d for d in after if d.get("track_id") is not None]
    if not a or not b:
        return
    cost = np.array([[1.0 - _iou(x["box"], y["box"]) if x.get("class") == y.get("class") else 1.0 for y in b] for x in a])
    _, rows, _ = lap.lapjv(cost, extend_cost=True, cost_limit=1.0 - MATCH_IOU)
    for i, j in enumerate(rows):
        if j >= 0:
            votes[(b[j]["track_id"], a[i]["track_id"])] += 1


def _stitch(votes: Counter, local_ids: set[int], next_id: int) -> tuple[dict[int, int], int]:
    """Local id → global id: the global id it matched most often (each global id taken once), else a new one."""
    mapping: dict[int, int] = {}
    taken: set[int] = set()
    for (local, global_id), _ in votes.most_common():
        if local not in mapping and global_id not in taken:
            mapping[local] = global_id
            taken.add(global_id)
    for local in sorted(local_ids - set(mapping)):
        mapping[local] = next_id
        next_id += 1
    return mapping, next_id


def _tracks(stats: dict[int, dict[str, Any]], metres: bool) -> dict[str, dict[str, Any]]:
    out = {}
    for tid in sorted(stats):
        s = stats[tid]
        row: dict[str, Any] = {
            "first_frame": s["first"],
            "last_frame": s["last"],
            "frames": s["frames"],
            "mean_speed_px_s": round(s["px"][0] / s["px"][1], 1) if s["px"][1] else None,
        }
        if metres:
            row["mean_speed_m_s"] = round(s["m"][0] / s["m"][1], 2) if s["m"][1] else None
        out[str(tid)] = row
    return out


def merge_infer(spec: Any, parts: list[Any], results: list[dict[str, Any]], workdir: Path) -> Iterator[Event]:
    """One results file (and annotated video) from the shards' pieces, track ids stitched across boundaries."""
    from synapse_cli.jobs._files import atomic_output
    from synapse_cli.jobs.infer.results import ResultsWriter
    from synapse_cli.jobs.infer.job import default_output

    started = time.monotonic()
    output = Path(spec.output or default_output(spec.source, spec.task))
    track = spec.task == "track"
    stats: dict[int, dict[str, Any]] = {}
    processed = detections = 0
    with atomic_output(output, spec.overwrite) as tmp:
        header, _, _ = _read(parts[0].output)
        header["source"] = spec.source_name  # the job's own name for its input (each piece says the same)
        writer = ResultsWriter(tmp, header, jsonl=output.suffix.lower() == ".jsonl")
        recent: dict[int, list[dict[str, Any]]] = {}  # the previous shard's last frames (ids already global), by frame
        next_id = 1
        for part in parts:
            _, frames, _ = _read(part.output)
            lead: dict[int, list[dict[str, Any]]] = {}
            mapping: dict[int, int] | None = None if track and part.lead_in else {}
            local_ids: set[int] = set()
            kept: dict[int, list[dict[str, Any]]] = {}
            for row in frames:
                if row.get("lead_in"):
                    lead[row["frame"]] = row["detections"]
                    local_ids.update(d["track_id"] for d in row["detections"] if d.get("track_id") is not None)
                    continue
                if mapping is None:  # the first own frame: every lead-in frame is in, so decide the ids now
                    votes: Counter = Counter()
                    for index, dets in lead.items():
                        if index in recent:
                            _votes(recent[index], dets, votes)
                    mapping, next_id = _stitch(votes, local_ids, next_id)
                for det in row["detections"]:
                    tid = det.get("track_id")
                    if tid is None:
                        continue
                    if tid not in mapping:  # the first shard keeps its ids; later, someone first seen after the lead-in is new
                        mapping[tid] = tid if part is parts[0] else next_id
                        next_id = max(next_id, mapping[tid] + 1)
                    det["track_id"] = gid = mapping[tid]
                    s = stats.setdefault(gid, {"first": row["frame"], "last": row["frame"], "frames": 0, "px": [0.0, 0], "m": [0.0, 0]})
                    s["last"] = row["frame"]
                    s["frames"] += 1
                    if det.get("speed_px_s") is not None:
                        s["px"][0] += det["speed_px_s"]
                        s["px"][1] += 1
                    if det.get("speed_m_s") is not None:
                        s["m"][0] += det["speed_m_s"]
                        s["m"][1] += 1
                writer.frame(row)
                processed += 1
                detections += len(row["detections"])
                if track:
                    kept[row["frame"]] = row["detections"]
                    if len(kept) > 4 * max(1, max((p.lead_in for p in parts), default=0)):
                        kept.pop(next(iter(kept)))
            if track and mapping:
                next_id = max(next_id, max(mapping.values()) + 1)
            recent = kept
        tracks = _tracks(stats, metres=spec.court is not None) if track else {}
        writer.finish({"processed_frames": processed, "tracks": tracks})
    yield Artifact(path=str(output), bytes=output.stat().st_size)
    if spec.annotated:
        yield from _join_annotated(spec, parts, results)
    first = results[0] if results else {}
    summary = {
        **{k: first.get(k) for k in ("task", "model", "threads", "workers", "device", "batch", "half")},
        "output": str(output),
        "annotated": spec.annotated,
        "frames": sum(int(r.get("frames") or 0) for r in results),
        "processed_frames": processed,
        "detections": detections,
        "tracks": len(tracks) if track else None,
        "fps": round(sum(float(r.get("fps") or 0.0) for r in results), 2),  # the shards ran at once: their rates add up
        "gpu_peak_mib": max((r["gpu_peak_mib"] for r in results if r.get("gpu_peak_mib") is not None), default=None),
    }
    yield Finished(result=summary, elapsed_s=round(time.monotonic() - started, 3))


def _join_annotated(spec: Any, parts: list[Any], results: list[dict[str, Any]]) -> Iterator[Event]:
    """The annotated pieces joined by stream copy, with the source's audio added once, then faststart."""
    from synapse_cli.jobs._files import atomic_output
    from synapse_cli.jobs._media import concat_list, find_ffmpeg, run_ffmpeg, url_args
    from synapse_cli.jobs.infer.encode import _MP4_AUDIO
    from synapse_cli.jobs.infer.sources import inspect_source

    info = inspect_source(spec.source)
    out = Path(spec.annotated)
    listing = concat_list(Path(parts[0].output).parent / "annotated.txt", [p.annotated for p in parts])
    exe = find_ffmpeg(spec.ffmpeg_path)
    with atomic_output(out, spec.overwrite) as tmp:
        args = [exe, "-f", "concat", "-safe", "0", "-i", str(listing)]
        if info.has_audio:
            args += [*url_args(spec.source), "-i", spec.source, "-map", "0:v:0", "-map", "1:a:0"]
            args += ["-c:a", "copy"] if (info.audio_codec or "") in _MP4_AUDIO else ["-c:a", "aac", "-b:a", "128k"]
        args += ["-c:v", "copy", "-movflags", "+faststart", "-f", "mp4", "-y", str(tmp)]
        frames = sum(int(r.get("frames") or 0) for r in results)
        for _ in run_ffmpeg(args, frames, info.fps or 25.0, phase="merge"):
            pass
    yield Artifact(path=str(out), bytes=out.stat().st_size)
