"""`python -m influence_cli` (also what torchrun runs: `torchrun ... -m influence_cli fit-factors CONFIG`)."""

from influence_cli.cli import main

if __name__ == "__main__":
    main()
