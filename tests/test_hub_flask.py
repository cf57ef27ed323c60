"""civitas.app.HubFlask: Flask with ``ensure_sync`` answered from a table. Each function's
answer is Flask's own, asked once; views and hooks run as under Flask."""

from __future__ import annotations

from flask import Flask, g

from civitas.app import HubFlask


def _app(cls: type[Flask]) -> Flask:
    app = cls(__name__)

    @app.before_request
    def before() -> None:
        g.seen = "before"

    @app.get("/sync")
    def sync_view() -> str:
        return f"sync {g.seen}"

    @app.get("/async")
    async def async_view() -> str:
        return "async"

    return app


def test_each_function_gets_flasks_answer_once(monkeypatch):
    app = _app(HubFlask)
    asked: list[object] = []
    original = Flask.ensure_sync

    def counting(self: Flask, func: object) -> object:
        asked.append(func)
        return original(self, func)  # type: ignore[arg-type]

    monkeypatch.setattr(Flask, "ensure_sync", counting)
    client = app.test_client()
    for _ in range(3):
        assert client.get("/sync").get_data(as_text=True) == "sync before"
    assert len(asked) == len(set(asked)) == 2  # the hook and the view, once each
    view = app.view_functions["sync_view"]
    assert app.ensure_sync(view) is view


def _outcome(app: Flask, func: object) -> str:
    try:
        synced = app.ensure_sync(func)  # type: ignore[arg-type]
    except RuntimeError as exc:  # Flask without its "async" extra (asgiref)
        return f"refused: {exc}"
    return "as is" if synced is func else "wrapped"


def test_an_async_view_is_answered_as_flask_answers_it_every_time():
    flask_app, hub_app = _app(Flask), _app(HubFlask)
    expected = _outcome(flask_app, flask_app.view_functions["async_view"])
    assert expected != "as is"
    for _ in range(2):
        assert _outcome(hub_app, hub_app.view_functions["async_view"]) == expected
    status = flask_app.test_client().get("/async").status_code
    assert hub_app.test_client().get("/async").status_code == status


def test_an_unhashable_callable_is_answered_without_the_table():
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self) -> str:
            return "x"

    app = HubFlask(__name__)
    func = Unhashable()
    assert app.ensure_sync(func) is func


def test_the_table_stays_bounded():
    app = HubFlask(__name__)
    for _ in range(2000):
        def func() -> None:
            return None
        assert app.ensure_sync(func) is func
    assert len(app._synced) <= 1024
