"""``python -m gradindex`` runs the command line."""

from gradindex.cli import main

if __name__ == "__main__":  # spawned worker processes (LDS retraining) import this module too
    main()
