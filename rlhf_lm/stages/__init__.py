"""One module per stage, each with a straight-line ``main(argv)`` that reads top to bottom."""
