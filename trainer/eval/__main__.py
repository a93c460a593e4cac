"""python -m trainer.eval: the same as python -m trainer eval."""

import sys

from trainer.eval.cli import main

sys.exit(main())
