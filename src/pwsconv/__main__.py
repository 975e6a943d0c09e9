"""``python -m pwsconv`` = the ``pwsconv`` command (also what torchrun launches: ``torchrun -m pwsconv train ...``)."""

from .cli import main

raise SystemExit(main())
