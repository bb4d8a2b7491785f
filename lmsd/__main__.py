"""`lmsd`: run the daemon in the foreground (`lms daemon up` starts it detached)."""

import argparse
import sys


def main() -> None:
    from lmsd import __version__

    parser = argparse.ArgumentParser(
        prog="lmsd",
        description="The lms daemon, in the foreground: owns the loaded models, serves the control plane on "
                    "run/lmsd.sock and the HTTP endpoint. `lms daemon up` starts it in the background; SIGINT "
                    "or SIGTERM stop it, draining running requests first.",
        epilog="Environment: LMS_HOME (one folder for everything: settings, models/, run/, logs/; default: "
               "platformdirs' data folder), LMS_MODELS_DIR (the models folder elsewhere).",
    )
    parser.add_argument("--version", action="version", version=f"lmsd {__version__}")
    parser.parse_args(sys.argv[1:])  # --help and --version exit here; anything else is an error (exit 2)

    from lmsd.app import main as run

    sys.exit(run([]))


if __name__ == "__main__":
    main()
