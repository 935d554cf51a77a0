"""`python -m haystream`."""

from haystream.cli import main

main()
