from synapse_cli.cli import main

main()
