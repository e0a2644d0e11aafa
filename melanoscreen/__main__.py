"""`python -m melanoscreen` runs the CLI."""

from melanoscreen.cli import main

main()
