"""Private helpers of ``synapse compile``.

- ``inputs``: read input files into compile units (schema, regex, grammar) or one-line input errors.
- ``normalize``: draft unification, ``$ref`` bundling, keyword walks over a schema.
- ``gbnf``: our JSON Schema / regex -> GBNF converter (no PyPI package gives llama.cpp GBNF).
- ``engines``: what each decoding engine compiles and how its artefact is verified (run in workers).
- ``pool``: worker processes that can be killed on timeout.
- ``cache``: results by content hash.

Nothing here imports the engines at module level: they load inside the worker.
"""
