"""``python -m medcap``: the command line, as launchers start it (``accelerate launch -m medcap ...``)."""

from medcap.cli import main

main()
