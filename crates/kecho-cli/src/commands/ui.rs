//! `kecho ui`: a web page of the cluster (channels, members, rates, drops, links, and the resource agents with
//! their load), updated live over server-sent events. The page is embedded in the binary; rates, drops and links
//! come from nodes started with `--report`; agents from their reports on `kecho.resources`, which the page's own
//! node follows as a cluster view (docs/RESOURCES.md).

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
    /// The channel resource agents report on (see `kecho agent`).
    #[arg(long, default_value = kecho_resources::wire::CHANNEL)]
    resources_channel: String,
    /// Do not show resource agents (the page then starts no node of its own).
    #[arg(long)]
    no_agents: bool,
}

pub async fn run(a: Args) -> Result<()> {
    if !(a.interval > 0.0 && a.interval.is_finite()) {
        bail!("--interval must be a positive number of seconds");
    }
    let reg = a.reg.addrs()?;
    let listen = parse_addr("listen", &a.listen)?;
    let interval = Duration::from_secs_f64(a.interval);
    let views = kecho_metrics::cluster::watch(reg.clone(), interval).await?;
    let agents = if a.no_agents { None } else { Some(agents(reg, a.resources_channel.clone(), interval)) };
    let pages = merge(views, agents);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("kecho ui on http://{}/ (registry {})", listener.local_addr()?, a.reg.registry);
    let app = router(pages);
    tokio::select! {
        r = axum::serve(listener, app) => r.context("the web server stopped"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// The agents as the page shows them (JSON, one object per agent as `kecho resources --format json` prints them),
/// or why they are not known; updated on every change of the view and every `interval` (for the ages).
#[derive(Clone, Debug, Default, PartialEq)]
struct Agents {
    list: Vec<serde_json::Value>,
    error: Option<String>,
}

/// Follows the agents' reports from a node of its own; retries (every 2 s) until the registry lets it join.
fn agents(registry: Vec<std::net::SocketAddr>, channel: String, interval: Duration) -> watch::Receiver<Agents> {
    let (tx, rx) = watch::channel(Agents::default());
    tokio::spawn(async move {
        let (_node, mut view) = loop {
            let started = async {
                let node = kecho::Node::builder().registry_replicas(registry.clone()).start().await?;
                let ch = node.channel(&channel).await?;
                let view = kecho_resources::View::start_on(&ch)?;
                anyhow::Ok((node, view))
            };
            match started.await {
                Ok(v) => break v,
                Err(e) => {
                    let error = Some(format!("cannot follow {channel}: {e:#}"));
                    if tx.send(Agents { list: Vec::new(), error }).is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        loop {
            let now = tokio::time::Instant::now().into_std();
            let list = view.snapshot().iter().map(|e| crate::commands::resources::json_line(e, now)).collect();
            if tx.send(Agents { list, error: None }).is_err() {
                return;
            }
            tokio::select! {
                r = view.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
    rx
}

/// The page's data: the registry's view with the agents added as `agents` (and `agents_error`).
fn merge(mut views: watch::Receiver<View>, agents: Option<watch::Receiver<Agents>>) -> watch::Receiver<String> {
    let page = |v: &View, a: Option<&Agents>| -> String {
        let mut j = serde_json::to_value(v).unwrap_or_else(|e| serde_json::json!({ "registry_error": e.to_string() }));
        if let (Some(map), Some(a)) = (j.as_object_mut(), a) {
            map.insert("agents".into(), serde_json::Value::Array(a.list.clone()));
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
