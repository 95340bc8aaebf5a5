"""``python -m gradindex`` runs the command line."""

from gradindex.cli import main

main()
