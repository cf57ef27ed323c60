from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import broker.models  # noqa: F401  (registers tables)
import consent.ledger.models  # noqa: F401
import consent.models  # noqa: F401
import idp.models  # noqa: F401
from kernel.db import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("no engine or sqlalchemy.url given to alembic")
        engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
