"""``python -m megacpm VERB ...`` (the same as the ``megacpm`` command)."""
from megacpm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
