"""One module per `edgeact` subcommand, each with add_parser(subparsers) and run(args) -> int."""
COMMANDS = ("convert", "run", "eval", "info", "bench", "steer", "sweep")
