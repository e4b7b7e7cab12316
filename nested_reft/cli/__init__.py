"""The `nested-reft` command line: thin adapters from flags to library functions."""
