"""`python -m deepeyes.data synth|inspect ...`: the data CLI (deepeyes.data.cli)."""

import sys

from deepeyes.data.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
