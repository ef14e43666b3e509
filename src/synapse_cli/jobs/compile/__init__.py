"""``synapse compile``: JSON Schemas and constraint sets -> artefacts for constrained decoding.

- ``job``: ``CompileSpec`` and the ``compile_constraints`` generator.

Its private helpers:

- ``inputs``: read input files into compile units (schema, regex, grammar) or one-line input errors.
- ``units``: a spec's units, each unit's state while its engines run, the engine work for the pool.
- ``checks``: ``--check``'s labelled instances; ``report``: a unit's report, files and events.
- ``shards``: the ``split``/``merge``/``size`` hooks (groups of inputs, one output folder).
- ``normalize``: draft unification, ``$ref`` bundling, keyword walks over a schema.
- ``gbnf``: our JSON Schema / regex -> GBNF converter (no PyPI package gives llama.cpp GBNF).
- ``engines``: what each decoding engine compiles and how its artefact is verified (run in workers).
- ``pool``: worker processes that can be killed on timeout.
- ``cache``: results by content hash.

Nothing here imports the engines at module level: they load inside the worker.
"""

from synapse_cli.config import ENGINES, Setting, number, optional_text, string_list, text
from synapse_cli.jobs import JobKind

KIND = JobKind(
    name="compile",
    spec="synapse_cli.jobs.compile.job:CompileSpec",
    run="synapse_cli.jobs.compile.job:compile_constraints",
    build="synapse_cli.jobs.compile.build:build_spec",
    command="synapse_cli.cli.compile:compile_command",
    options={"output_dir": "compile.output_dir", "engine": "compile.engines"},
    settings={
        "output_dir": Setting("compiled", text, "where artefacts go when -o is not given"),
        "engines": Setting(list(ENGINES), string_list, "engines to compile for (llguidance, xgrammar, outlines, llama.cpp)"),
        "engine_timeout_s": Setting(10.0, number(), "per-engine, per-schema compile timeout"),
        "cache_dir": Setting(None, optional_text, "compile cache; default: the user cache dir"),
    },
    image="engines",
    split="synapse_cli.jobs.compile.shards:split_compile",
    merge="synapse_cli.jobs.compile.shards:merge_compile",
    size="synapse_cli.jobs.compile.shards:compile_units",
    shard_by="units",
    names="synapse_cli.jobs.compile.job:compile_names",
)
