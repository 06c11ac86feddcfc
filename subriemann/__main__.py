"""``python -m subriemann``: the ``subriemann`` command-line program (see :mod:`subriemann.cli`)."""

import sys

from subriemann.cli import main

if __name__ == "__main__":
    sys.exit(main())
