"""`python -m proxy` is the `resumable-proxy` command."""

from .cli import main

main()
