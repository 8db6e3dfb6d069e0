"""One part of the benchmark run alone, `python -m bench.pruning ...` or `python -m bench.reduction ...`, as
bench/cli.py runs it as a subcommand: the part's own options, the command line recorded in its figures, the figures
written to --json when it is given."""
import argparse
import json
import sys


def run_alone(module: str, description: str, add_arguments, bench) -> dict:
    """Parse sys.argv with `add_arguments`, call `bench(arguments)` (it prints its table) and write what it returns
    to arguments.json; the figures record the command as `python -m {module} ...`."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    arguments = parser.parse_args()
    arguments.command_line = " ".join([f"python -m {module}", *sys.argv[1:]])
    figures = bench(arguments)
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {arguments.json}")
    return figures
