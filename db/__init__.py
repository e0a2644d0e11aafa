"""The database: schema, session factory, query functions and Alembic migrations.

Every query function takes the session first and never commits (the caller owns the
transaction: `with sessions.begin() as session:`).
"""
