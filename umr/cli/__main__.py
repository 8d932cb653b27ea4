"""`python -m umr.cli`, as the tests and benchmarks start the command."""
import sys

from umr.cli import main

sys.exit(main())
