"""``python -m p2ptrain`` runs the CLI."""

import sys

from p2ptrain._cli import main

sys.exit(main())
