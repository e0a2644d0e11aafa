"""`python -m melanoscreen` runs the CLI."""

from melanoscreen.cli.app import main

main()
