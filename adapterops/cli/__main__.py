"""``python -m adapterops.cli``: the command line (what ``adapterops train --nproc`` runs under torchrun)."""

from . import main

main()
