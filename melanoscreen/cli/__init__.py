"""The `melanoscreen` command: one module per command group, their shared helpers in `_common`,
and the `up` supervisor. `app.main` is the console entry point."""
