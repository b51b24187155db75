"""``python -m finegrain ...`` (also what ``torchrun -m finegrain train ...`` runs)."""

from .cli import main

raise SystemExit(main())
