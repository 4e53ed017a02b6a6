"""Alembic's entry point: runs the migrations on the connection database.migrate() passes."""

from alembic import context

from pagoda.server.keys.schema import metadata

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
