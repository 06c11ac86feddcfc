"""``python -m subriemann``: the ``subriemann`` program (see :mod:`subriemann.app.cli`)."""

import sys

from subriemann.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
