"""`python -m lesiongen` (and so `accelerate launch -m lesiongen ...`)."""

from lesiongen.cli.app import main

if __name__ == "__main__":
    main()
