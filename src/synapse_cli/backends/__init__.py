"""Backends: where a job generator runs. One method, ``run(job, spec) -> Iterator[Event]``, plus ``close()``."""
