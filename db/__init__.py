"""The database: schema, session factory, query functions and Alembic migrations."""
