"""`python -m medusa_bench.cli`."""

from medusa_bench.cli import main

main()
