"""The `nnunet-segmamba` command's tools; each module has a `main(args)` and an `add_arguments(parser)`."""
