"""`python -m umr`: the umr command (how `umr serve --replicas` starts its replicas)."""
import sys

from umr.cli import main

sys.exit(main())
