"""The use cases: each rule of the service once, called by every entry point that needs it."""
