"""`python -m foalnet_cli ...` is `foalnet ...`."""

from foalnet_cli import main

main()
