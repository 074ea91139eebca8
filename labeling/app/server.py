"""Assemble the app (`build_app`), wrap it in an ASGI server with login (`make_asgi_app`), run it (`serve`).

Login is Gradio's own (`auth=`), backed by the store's scrypt hashes, with a lockout on
failed attempts; `--single-user` replaces it by one local admin account and must be asked
for explicitly. Server-side rendering stays off: the page is the client-rendered bundle,
so no Node process renders user content on the server.
"""

import html
import threading

import gradio as gr
import uvicorn
from fastapi import FastAPI

from labeling.app._compat_gradio import enforce_upload_origin, skip_queue_analytics
from labeling.app.admin import build_admin_tab, guidelines_html
from labeling.app.annotate import build_annotate_tab
from labeling.app.assets import CSS, KEYS_JS, theme
from labeling.app.auth import (
    AccessDenied,
    ClientAddressMiddleware,
    caller_for,
    make_auth,
)
from labeling.app.dashboard import build_dashboard_tab
from labeling.app.gateway import Gateway, GatewaySettings
from labeling.app.session_guard import SessionGuardMiddleware, SessionOwners, gradio_user_lookup
from labeling.app.single import build_single_tab
from labeling.app.state import AppConfig, AppState


def build_app(state: AppState) -> gr.Blocks:
    with gr.Blocks(
        title=state.config.title,
        analytics_enabled=False,
        # Uploads and exports older than upload_max_age_s (a day) are deleted, checked hourly or sooner.
        delete_cache=(min(3600, state.config.upload_max_age_s), state.config.upload_max_age_s),
    ) as blocks:
        with gr.Row(elem_classes="pf-header"):
            gr.HTML(
                f'<div class="pf-brand">{html.escape(state.config.title)}</div>', js_on_load=None
            )
            who = gr.HTML("", elem_id="pf-who", js_on_load=None)
        with gr.Accordion("Guidelines", open=False, elem_id="pf-guidelines"):
            guidelines = gr.HTML("", js_on_load=None, elem_classes="pf-guidelines")
        with gr.Tabs():
            with gr.Tab("Rank pairs", id="pairs", elem_id="pf-tab-pairs"):
                annotate = build_annotate_tab(state)
            with gr.Tab(
                "Rate single responses", id="single", elem_id="pf-tab-single"
            ) as single_tab:
                single = build_single_tab(state)
            with gr.Tab(
                "Dashboard", id="dashboard", visible=False, elem_id="pf-tab-dashboard"
            ) as dashboard_tab:
                dashboard = build_dashboard_tab(state)
            with gr.Tab("Admin", id="admin", visible=False, elem_id="pf-tab-admin") as admin_tab:
                admin = build_admin_tab(state)

        def on_load(request: gr.Request):
            try:
                caller = caller_for(state, request.username)
            except AccessDenied as error:
                raise gr.Error(str(error)) from None
            sign_out = (
                "" if state.local_rater_id is not None else ' · <a href="logout">Sign out</a>'
            )
            badge = (
                f"Signed in as <b>{html.escape(caller.name)}</b> ({caller.role.value}){sign_out}"
            )
            return (
                badge,
                guidelines_html(state),
                gr.Tab(visible=caller.is_admin),
                gr.Tab(visible=caller.is_admin),
            )

        blocks.load(on_load, [], [who, guidelines, dashboard_tab, admin_tab], api_name="whoami")
        fn, inputs, outputs, options = annotate["load"]
        blocks.load(fn, inputs, outputs, api_name="open_pairs", **options)
        blocks.load(*admin["load"], api_name="admin_open")
        fn, inputs, outputs, options = single["load"]
        single_tab.select(fn, inputs, outputs, api_name="open_single", **options)
        dashboard_tab.select(*dashboard["refresh"], api_visibility="private")
    # api_open=False: every event goes through the queue (and its concurrency limit), none around it.
    # status_update_rate: events take milliseconds, so no queue-position estimates are broadcast.
    blocks.queue(
        api_open=False,
        default_concurrency_limit=state.config.concurrency_limit,
        status_update_rate=3600,
    )
    skip_queue_analytics(blocks)
    return blocks


def make_asgi_app(state: AppState) -> FastAPI:
    """The FastAPI app serving the page and its API, with login unless single-user."""
    blocks = build_app(state)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ClientAddressMiddleware)
    app = gr.mount_gradio_app(
        app,
        blocks,
        path="",
        auth=None if state.config.single_user else make_auth(state),
        auth_message=(
            "Sign in with your prefloop account (an admin creates it: `prefloop users add NAME`). "
            f"After {state.config.max_failed_logins} failed attempts, sign-in for that account from this "
            f"address pauses for {state.config.lockout_window_s / 60:.0f} minutes."
        ),
        ssr_mode=False,
        show_error=True,
        footer_links=[],
        max_file_size=state.config.max_upload_mb * 1024 * 1024,  # uploads are admins' prompt files
        run_history=False,
        mcp_server=False,
        enable_monitoring=False,
        css=CSS,
        theme=theme(),
        head=f"<script>{KEYS_JS}</script>",
    )
    # Gradio checks that event file paths are its uploads only once "launched"; mounting never says so.
    enforce_upload_origin(blocks)
    # Each Gradio session hash belongs to the user who first used it (see session_guard).
    app.add_middleware(SessionGuardMiddleware, current_user=gradio_user_lookup(app), owners=SessionOwners())
    # Added last, so it runs first: routes, origins, accounts, bodies, cookies (see gateway).
    app.add_middleware(
        Gateway,
        state=state,
        outer_app=app,
        settings=GatewaySettings(
            allowed_origins=frozenset(state.config.allowed_origins),
            max_event_bytes=state.config.max_event_kb * 1024,
            max_upload_bytes=state.config.max_upload_mb * 1024 * 1024,
        ),
    )
    app.state.prefloop = state
    return app


def serve(
    state: AppState, *, host: str = "127.0.0.1", port: int = 7860, log_level: str = "warning"
) -> None:
    """Run the app until interrupted (`prefloop serve`)."""
    try:
        uvicorn.run(
            make_asgi_app(state),
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=3,
            **proxy_settings(state.config.forwarded_allow_ips),
        )
    finally:
        state.jobs.stop_all()


def proxy_settings(forwarded_allow_ips: str | None) -> dict:
    """uvicorn trusts X-Forwarded-For/-Proto from loopback peers unless told otherwise, so any
    local client could claim any address. Honour those headers only from the proxies the
    operator names."""
    if not forwarded_allow_ips:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": forwarded_allow_ips}


def launch(
    config: AppConfig, *, host: str = "127.0.0.1", port: int = 7860, command_line=None
) -> None:
    """Start the app on an existing, migrated store and block until interrupted.

    For `prefloop demo`: `launch(AppConfig(db_url=url, single_user="demo"))` opens the app
    with no sign-in, as the admin "demo" (created if missing). Web jobs need `command_line`
    (see AppState.create).
    """
    state = AppState.create(config, command_line=command_line)
    print(f"prefloop app on http://{host}:{port}", flush=True)
    serve(state, host=host, port=port)


class BackgroundServer:
    """The app on a thread of this process (tests, notebooks): `with BackgroundServer(state) as url:`."""

    def __init__(self, state: AppState, *, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn.Config(
            make_asgi_app(state),
            host=host,
            port=port,
            log_level="warning",
            **proxy_settings(state.config.forwarded_allow_ips),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.state = state

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the app server failed to start")
            threading.Event().wait(0.05)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.jobs.stop_all()
