"""``python -m megacpm VERB ...`` (the same as the ``megacpm`` command)."""
import sys

try:
    from megacpm.cli import main
except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing has started, nothing to say but that
    print("megacpm: error: interrupted", file=sys.stderr)
    raise SystemExit(130)

if __name__ == "__main__":
    raise SystemExit(main())
