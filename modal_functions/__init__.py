"""The Modal app for synapse: thin function wrappers over ``synapse_cli.jobs`` (see ``app.py``)."""
