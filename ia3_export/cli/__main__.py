"""`python -m ia3_export.cli`: the same as the `ia3-export` command."""
from . import main

main()
