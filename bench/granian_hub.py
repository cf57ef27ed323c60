"""The hub's WSGI app for bench/run.py --server granian (an experiment, not a way to deploy).

Like the workers of `civitas serve --workers N`: the schema was brought up to date before the
server started (bench/run.py runs `civitas db upgrade`), so the app is built without migrating
and without importing Alembic. Settings come from $CIVITAS_CONFIG."""

from civitas.app import create_app

app = create_app(migrate=False)
