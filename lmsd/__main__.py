"""`lmsd`: run the daemon in the foreground (`lms daemon up` starts it detached)."""

import sys

from lmsd.app import main as _main


def main() -> None:
    sys.exit(_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
