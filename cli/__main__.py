"""python3 -m graphopt.cli: the same as opt-cli."""
import sys

from graphopt.cli import main

sys.exit(main())
