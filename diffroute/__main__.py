"""`python -m diffroute` (also what `accelerate launch -m diffroute` runs)."""

from diffroute.cli.main import main

if __name__ == "__main__":
    main()
