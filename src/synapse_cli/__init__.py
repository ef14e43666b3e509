"""synapse: one command for media and model jobs, in-process or on Modal."""

__version__ = "0.1.0"
