"""One job in a child process, for sharded local runs: the same generator, its events as NDJSON.

``python -m synapse_cli.backends._worker`` reads ``{"kind", "spec"}`` as JSON on stdin and
writes the job's events on stdout, one JSON object a line, ending with ``finished`` or
``error``. SIGTERM stops it as Ctrl-C would: the job's cleanup runs (ffmpeg is killed,
temporary files removed). ``WorkerCall`` is the parent's side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import asdict
from typing import Any, Iterator

from synapse_cli.errors import JobError, error_from_wire
from synapse_cli.events import Event, Failed, from_dict


class WorkerCall:
    """A job running in a worker process: iterate for its events; ``cancel()`` from any thread stops it."""

    def __init__(self, kind: str, spec: Any) -> None:
        self.kind = kind
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._cancelled = False

    def __iter__(self) -> Iterator[Event]:
        return self._events()

    def _events(self) -> Iterator[Event]:
        with self._lock:
            if self._cancelled:
                return
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "synapse_cli.backends._worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
        proc = self._proc
        tail: deque[str] = deque(maxlen=20)
        drain = threading.Thread(target=lambda: tail.extend(ln.decode("utf-8", "replace").rstrip() for ln in proc.stderr), daemon=True)  # type: ignore[union-attr]
        drain.start()
        try:
            proc.stdin.write(json.dumps({"kind": self.kind, "spec": asdict(self.spec)}).encode())  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
            ended = False
            for line in proc.stdout:  # type: ignore[union-attr]
                if not line.strip():
                    continue
                event = from_dict(json.loads(line))
                if isinstance(event, Failed):
                    raise error_from_wire(event.error, event.code, event.message)
                ended = ended or event.type == "finished"
                yield event
            rc = proc.wait()
            if not ended and not self._cancelled:
                drain.join(timeout=2)
                raise JobError(f"the {self.kind} worker process exited {rc} without a result: {' | '.join(list(tail)[-2:]) or 'no output'}")
        finally:
            self.cancel()

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM: the job cleans up, as on Ctrl-C); returns at once."""
        with self._lock:
            self._cancelled = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def cancel(self) -> None:
        """Stop the worker and wait for it: SIGTERM, then SIGKILL if it has not gone within 30 s."""
        self.terminate()
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def close(self) -> None:
        self.cancel()


def main() -> int:
    from synapse_cli.events import failed, to_dict
    from synapse_cli.jobs import load_job, spec_from_dict

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    out = sys.stdout
    try:
        request = json.loads(sys.stdin.read())
        kind = request["kind"]
        gen = load_job(kind)(spec_from_dict(kind, request["spec"]))
        try:
            for event in gen:
                out.write(json.dumps(to_dict(event)) + "\n")
                out.flush()
        finally:
            gen.close()  # type: ignore[attr-defined]  # (a job's generator: closing it stops the job)
    except BaseException as exc:  # noqa: BLE001 - every failure is the stream's last line
        out.write(json.dumps(to_dict(failed(exc))) + "\n")
        out.flush()
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
