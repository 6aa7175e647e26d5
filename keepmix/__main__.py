"""`python -m keepmix` (and `accelerate launch -m keepmix`, `torchrun -m keepmix`)."""

import sys

from keepmix.cli import main

sys.exit(main())
