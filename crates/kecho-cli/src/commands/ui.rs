//! `kecho ui`: a web page of the cluster (channels, members, rates, drops, links), updated live over server-sent
//! events. The page is embedded in the binary; rates, drops and links come from nodes started with `--report`.

use std::convert::Infallible;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use kecho_metrics::cluster::View;
use tokio::sync::watch;

use crate::node_args::{parse_addr, RegistryArg};

/// The page, embedded.
const PAGE: &str = include_str!("ui.html");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to serve the page on.
    #[arg(long, default_value = "127.0.0.1:7480")]
    listen: String,
    #[command(flatten)]
    reg: RegistryArg,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
}

pub async fn run(a: Args) -> Result<()> {
    if !(a.interval > 0.0 && a.interval.is_finite()) {
        bail!("--interval must be a positive number of seconds");
    }
    let reg = parse_addr("registry", &a.reg.registry)?;
    let listen = parse_addr("listen", &a.listen)?;
    let views = kecho_metrics::cluster::watch(reg, Duration::from_secs_f64(a.interval)).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("kecho ui on http://{}/ (registry {reg})", listener.local_addr()?);
    let app = router(views);
    tokio::select! {
        r = axum::serve(listener, app) => r.context("the web server stopped"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// `/` (the page), `/events` (the view, as server-sent events `view` with JSON data, one per refresh) and
/// `/view.json` (the view now).
fn router(views: watch::Receiver<View>) -> axum::Router {
    let for_events = views.clone();
    axum::Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response() }))
        .route(
            "/view.json",
            get(move || {
                let view = views.borrow().clone();
                async move { json(&view).into_response() }
            }),
        )
        .route(
            "/events",
            get(move || {
                let rx = for_events.clone();
                async move { Sse::new(stream(rx)).keep_alive(KeepAlive::default()) }
            }),
        )
}

fn json(view: &View) -> ([(header::HeaderName, &'static str); 1], String) {
    let body = serde_json::to_string(view).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// The current view at once, then every new one.
fn stream(rx: watch::Receiver<View>) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let view = rx.borrow_and_update().clone();
        let data = serde_json::to_string(&view).unwrap_or_default();
        Some((Ok(Event::default().event("view").data(data)), (rx, false)))
    })
}
