"""The ``medcap`` command line: thin click commands that parse, load the config and call the library.

Every command accepts ``-v`` (more detail, repeatable) and ``-q`` (warnings only), before or after
its name. Errors a user can fix end with one ``error:`` line and exit code 2, never a traceback.
"""

from medcap.cli import data_cmds, pipeline_cmds, results_cmds  # noqa: F401  (they add their commands)
from medcap.cli.common import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
