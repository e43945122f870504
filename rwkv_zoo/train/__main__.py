"""``python -m rwkv_zoo.train`` (``torchrun --nproc_per_node=N -m rwkv_zoo.train ...``)."""

import sys

from rwkv_zoo.cli.train import main

sys.exit(main())
