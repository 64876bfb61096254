"""`python -m alignti ...` is the `alignti` command (scripts and `accelerate launch -m alignti distill ...`)."""

from alignti.cli import main

main()
