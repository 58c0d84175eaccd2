"""One module per ``opticam`` command; each adds its parser and runs it.

Every module here has ``add_parser(sub)``, which adds the command to the subcommands of
the ``opticam`` parser, and ``run(args)``, which does it and returns the exit status.
"""

from opticam.cli.commands import config, demo_data, deploy, explain, pack, report, run, worker

#: The commands in the order ``opticam --help`` lists them.
COMMANDS = (run, config, report, explain, pack, demo_data, deploy, worker)

__all__ = ["COMMANDS"]
