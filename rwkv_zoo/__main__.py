"""``python -m rwkv_zoo``: the ``rwkv-zoo`` command line (see ``rwkv_zoo.cli``)."""

import sys

from rwkv_zoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
