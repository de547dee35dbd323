"""`python -m hellora_pl.budget`."""

from .cli import main

main()
