//! `kecho ui`: a web page of the cluster (channels, members, rates, drops, links, and the resource agents with
//! their load), updated live over server-sent events. The page is embedded in the binary; rates, drops and links
//! come from nodes started with `--report`; agents from their reports on `kecho.resources`, which the page's own
//! node follows as a cluster view (docs/RESOURCES.md).

use std::convert::Infallible;

use anyhow::{Context, Result};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use kecho_metrics::cluster::View;
use tokio::sync::watch;

use crate::commands::live::{Agents, LiveArgs};
use crate::node_args::parse_addr;

/// The page, embedded.
const PAGE: &str = include_str!("ui.html");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to serve the page on.
    #[arg(long, default_value = "127.0.0.1:7480")]
    listen: String,
    #[command(flatten)]
    live: LiveArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let listen = parse_addr("listen", &a.listen)?;
    let live = a.live.start().await?;
    let pages = merge(live.views, live.agents);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("kecho ui on http://{}/ (registry {})", listener.local_addr()?, a.live.reg.registry);
    let app = router(pages);
    tokio::select! {
        r = axum::serve(listener, app) => r.context("the web server stopped"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// The page's data: the registry's view with the agents added as `agents` (and `agents_error`).
fn merge(mut views: watch::Receiver<View>, agents: Option<watch::Receiver<Agents>>) -> watch::Receiver<String> {
    let page = |v: &View, a: Option<&Agents>| -> String {
        let mut j = serde_json::to_value(v).unwrap_or_else(|e| serde_json::json!({ "registry_error": e.to_string() }));
        if let (Some(map), Some(a)) = (j.as_object_mut(), a) {
            // One object per agent as `kecho resources --format json` prints them.
            let now = a.at.unwrap_or_else(std::time::Instant::now);
            let list = a.list.iter().map(|e| crate::commands::resources::json_line(e, now)).collect();
            map.insert("agents".into(), serde_json::Value::Array(list));
            map.insert("agents_error".into(), a.error.clone().into());
        }
        j.to_string()
    };
    let first = page(&views.borrow(), agents.as_ref().map(|a| a.borrow().clone()).as_ref());
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut agents = agents;
        loop {
            tokio::select! {
                r = views.changed() => if r.is_err() { return },
                r = async {
                    match agents.as_mut() {
                        Some(a) => a.changed().await,
                        None => std::future::pending().await,
                    }
                } => if r.is_err() { return },
            }
            let a = agents.as_mut().map(|a| a.borrow_and_update().clone());
            let p = page(&views.borrow_and_update(), a.as_ref());
            if tx.send(p).is_err() {
                return;
            }
        }
    });
    rx
}

/// `/` (the page), `/events` (the view, as server-sent events `view` with JSON data, one per refresh) and
/// `/view.json` (the view now).
fn router(views: watch::Receiver<String>) -> axum::Router {
    let for_events = views.clone();
    axum::Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response() }))
        .route(
            "/view.json",
            get(move || {
                let view = views.borrow().clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], view).into_response() }
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

/// The current view at once, then every new one.
fn stream(rx: watch::Receiver<String>) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let data = rx.borrow_and_update().clone();
        Some((Ok(Event::default().event("view").data(data)), (rx, false)))
    })
}
