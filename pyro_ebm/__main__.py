"""``python -m pyro_ebm ...``: the ``pyro-ebm`` command (also under ``torchrun``)."""

import sys

from pyro_ebm.cli import main

if __name__ == "__main__":
    sys.exit(main())
