"""``python -m synapse_cli`` and the ``synapse`` console script."""

import gc


def main() -> None:
    # Start-up allocates a few hundred thousand objects and frees almost none of them (modules,
    # typer's option tree, dataclasses), so the collections that importing them triggers find
    # nothing: 15-20 ms of a short export's start here. What it built is frozen, so later
    # collections (during a long job) do not walk it either.
    gc.disable()
    try:
        from synapse_cli.cli import main as cli
    finally:
        gc.freeze()
        gc.enable()
    cli()


if __name__ == "__main__":
    main()
