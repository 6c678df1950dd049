"""``python -m longreach.cli``: the same CLI as the ``longreach`` script."""

from longreach.cli import main

main()
