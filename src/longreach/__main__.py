"""``python -m longreach``: the same CLI as the ``longreach`` script."""

from longreach.cli import main

main()
