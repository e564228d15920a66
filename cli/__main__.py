"""`python -m cli`: the same as the `tenantctl` console script."""

from cli.main import main

main()
