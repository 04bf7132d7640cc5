"""The `lesiongen` command line (installed as `lesiongen.cli`). One module per command group."""
