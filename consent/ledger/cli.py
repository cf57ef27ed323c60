"""``civitas audit ...``: checkpoint, a sealer process, public key, export, offline verify.

The composition root adds the group: ``main.add_command(make_audit_cli(get_ledger))`` where
``get_ledger(ctx)`` builds the :class:`~consent.ledger.Ledger` from the settings. ``verify``
never calls it: it needs only the file and the public key.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from .errors import LedgerError, VerificationFailed
from .export import export_ledger
from .ledger import Ledger
from .verify import verify_export


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or time") from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _text_or_file(value: str) -> str:
    """A value given inline, or ``@path`` / an existing file holding it."""
    path = Path(value[1:] if value.startswith("@") else value)
    if value.startswith("@") or (len(value) < 4096 and path.is_file()):
        try:
            return path.read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc}") from exc
    return value


def make_audit_cli(get_ledger: Callable[[click.Context], Ledger]) -> click.Group:
    @click.group("audit")
    def audit_group() -> None:
        """The audit ledger: signed checkpoints, exports, offline verification."""

    @audit_group.command("checkpoint")
    @click.pass_context
    def checkpoint(ctx: click.Context) -> None:
        """Seal every committed entry now and print the signed checkpoint."""
        ledger = get_ledger(ctx)
        try:
            click.echo(ledger.checkpoint().note, nl=False)
        except LedgerError as exc:
            raise click.ClickException(str(exc)) from exc

    @audit_group.command("seal")
    @click.option("--every", type=click.FloatRange(min=0.01, max=86400), required=True,
                  metavar="SECONDS", help="Seal and sign a checkpoint this often.")
    @click.option("--settle", type=click.FloatRange(min=0, max=3600), default=2.0,
                  show_default=True, metavar="SECONDS",
                  help="Leave entries younger than this to the next round.")
    @click.option("--heartbeat", type=click.Path(dir_okay=False, writable=True), default=None,
                  help="Touch this file after every round that completed (for a health "
                       "check: a file older than a few rounds means sealing is failing).")
    @click.pass_context
    def seal(ctx: click.Context, every: float, settle: float, heartbeat: str | None) -> None:
        """Run the sealer in this process until stopped (SIGTERM or Ctrl-C): the hub's
        workers then set ``ledger_seal_interval_seconds: 0`` and do no sealing at all."""
        import signal
        import threading

        from .sealer import LedgerSealer

        if heartbeat is not None:
            try:  # an unwritable heartbeat is a usage error now, not a crash in a later round
                Path(heartbeat).touch()
            except OSError as exc:
                raise click.BadParameter(f"cannot write {heartbeat}: {exc.strerror}",
                                         param_hint="--heartbeat") from exc
        sealer = LedgerSealer(get_ledger(ctx), interval=every, settle=timedelta(seconds=settle))
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        click.echo(f"sealing every {every:g} s; stop with SIGTERM or Ctrl-C")
        try:
            while True:
                made = sealer.run_once()  # failures are logged and retried next round
                if made is not None:
                    click.echo(f"checkpoint signed at size {made.size}")
                if heartbeat is not None and sealer.healthy:
                    Path(heartbeat).touch()
                if stop.wait(every):
                    break
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
        click.echo("sealer stopped")

    @audit_group.command("pubkey")
    @click.pass_context
    def pubkey(ctx: click.Context) -> None:
        """Print the checkpoint verifier key to publish (signed-note format)."""
        click.echo(get_ledger(ctx).public_key())

    @audit_group.command("export")
    @click.option("--from", "since", help="First moment (ISO 8601, UTC if no offset).")
    @click.option("--to", "until", help="End moment, excluded (ISO 8601).")
    @click.option("--prove-from", "prove_from", type=int, multiple=True,
                  help="Also prove consistency from this earlier tree size (one an auditor "
                       "kept a checkpoint of); repeat for several.")
    @click.option("--no-seal", is_flag=True, help="Do not seal pending entries first.")
    @click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
    @click.pass_context
    def export(ctx: click.Context, since: str | None, until: str | None,
               prove_from: tuple[int, ...], no_seal: bool, file: str) -> None:
        """Write entries, checkpoints and consistency proofs (JSON Lines) to FILE."""
        ledger = get_ledger(ctx)
        try:
            if not no_seal:
                ledger.seal_all()
            if file == "-":
                summary = export_ledger(ledger, sys.stdout.buffer, since=_when(since),
                                        until=_when(until), prove_from=prove_from)
            else:
                with open(file, "wb") as out:
                    summary = export_ledger(ledger, out, since=_when(since),
                                            until=_when(until), prove_from=prove_from)
        except LedgerError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # the file cannot be written: its directory, a full disk
            raise click.ClickException(
                f"cannot write {file}: {exc.strerror or exc}") from exc
        click.echo(f"exported leaves {summary.start}..{summary.end} ({summary.entries} "
                   f"entries, {summary.checkpoints} checkpoints)", err=True)

    @audit_group.command("verify")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False))
    @click.option("--public-key", "public_key", required=True,
                  help="The hub's verifier key (name+id+key), or @FILE holding it.")
    @click.option("--trusted-checkpoint", "trusted", multiple=True,
                  help="A checkpoint note FILE kept from before; the export must extend it.")
    @click.option("--quiet", is_flag=True, help="No progress on stderr.")
    def verify(file: str, public_key: str, trusted: tuple[str, ...], quiet: bool) -> None:
        """Verify an export offline; exit 1 naming the first failing line."""
        total = Path(file).stat().st_size
        began = last = time.monotonic()

        def progress(done: int) -> None:
            nonlocal last
            now = time.monotonic()
            if not quiet and (now - last >= 0.5 or done == total):
                last = now
                click.echo(f"\rverifying: {100 * done // max(total, 1)}% "
                           f"({done >> 20} MiB)", nl=False, err=True)

        notes = [Path(t).read_text() for t in trusted]
        try:
            with open(file, "rb") as stream:
                report = verify_export(stream, _text_or_file(public_key).strip(),
                                       trusted=notes, progress=progress)
        except VerificationFailed as exc:
            if not quiet:
                click.echo("", err=True)
            click.echo(f"FAILED {file}: {exc}", err=True)
            sys.exit(1)
        if not quiet:
            click.echo("", err=True)
        elapsed = time.monotonic() - began
        click.echo(f"OK {file}: {report.entries} entries (leaves {report.start}.."
                   f"{report.end}), {report.checkpoints} checkpoints, "
                   f"{report.consistency_proofs} consistency proofs verified for "
                   f"{report.origin} in {elapsed:.1f}s")
        for size in report.trusted_checked:
            click.echo(f"  extends the trusted checkpoint of size {size}")
        for note in report.notes:
            click.echo(f"  note: {note}")

    return audit_group
