"""``civitas secrets reencrypt`` on a large table: how long retiring an encryption key takes.

    .venv/bin/python bench/reencrypt_scale.py [--accounts 100000] [--batch 500]

Starts PostgreSQL (tests/servers.py, a temporary cluster) and the hub in-process on it, loads
``--accounts`` citizens with ``bench/load_data.py`` (their attributes encrypted by the hub's
``FieldCipher`` under the settings' key, as logins write them; few consent events), then
puts a new key first and times :func:`kernel.reencrypt.reencrypt_column` over the
attributes: a dry run (the census), the rewrite, and a second run that finds nothing to do.
Prints rows per second of each and checks that every value now reads with the new key
alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from bench.load_data import bench_settings, load, start_hub  # noqa: E402
from broker.models import AccountAttribute  # noqa: E402
from civitas.cli import encrypted_columns  # noqa: E402
from config import settings_from_mapping  # noqa: E402
from kernel.crypto import DecryptionError, FieldCipher  # noqa: E402
from kernel.reencrypt import reencrypt_column  # noqa: E402
from tests import servers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="civitas-reencrypt-") as workdir, \
            servers.run_postgres(Path(workdir) / "pg") as url:
        settings = settings_from_mapping(bench_settings(url, 2))
        app = start_hub(settings)
        hub = app.extensions["civitas"]
        print(f"loading {args.accounts:,} accounts ...", flush=True)
        load(hub, accounts=args.accounts, events=args.accounts)
        with hub.db.session() as s:
            rows = s.scalar(select(func.count()).select_from(AccountAttribute))
        old = settings.encryption_keys[0]
        new = FieldCipher.generate_key()
        cipher = FieldCipher([new, old])
        column = next(c for c in encrypted_columns() if c.model is AccountAttribute)
        print(f"{rows:,} attribute values under the old key; batches of {args.batch}\n")
        print(f"{'pass':<34}{'rows':>10}{'rewritten':>11}{'seconds':>9}{'rows/s':>10}")
        for name, dry in (("dry run (census)", True), ("rewrite under the new key", False),
                          ("again: nothing left to do", False)):
            started = time.perf_counter()
            census = reencrypt_column(hub.db, cipher, column, dry_run=dry, batch=args.batch)
            seconds = time.perf_counter() - started
            print(f"{name:<34}{census.scanned:>10,}{census.rewritten:>11,}{seconds:>9.1f}"
                  f"{census.scanned / seconds:>10,.0f}", flush=True)
        alone = FieldCipher([new])
        with hub.db.session() as s:
            values = s.scalars(select(AccountAttribute.value_encrypted))
            unread = sum(1 for v in values if not _reads(alone, v))
        print(f"\nvalues that the new key alone cannot read: {unread}")
        hub.db.dispose()
        return 1 if unread else 0


def _reads(cipher: FieldCipher, value: str) -> bool:
    try:
        cipher.decrypt(value)
    except DecryptionError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
