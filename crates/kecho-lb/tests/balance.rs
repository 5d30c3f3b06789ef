//! The balancer over real HTTP servers that are members of a kecho channel: discovery, spreading, health.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use kecho::{Node, RegistryClient, SinkOptions};
use kecho_lb::balance::{follow, Balancer, Mode};

const T: Duration = Duration::from_secs(15);
/// Long enough that a loaded machine (both cores busy with other builds) does not miss heartbeats of live nodes.
const HEARTBEAT: Duration = Duration::from_secs(3);

/// An HTTP server answering its own address, on a kecho node whose sink advertises it.
async fn server(reg: &RegistryClient, load: f64) -> Result<(Node, kecho::Sink, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move || async move { addr.to_string() });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let node = Node::builder().registry_client(reg.clone()).heartbeat_timeout(HEARTBEAT).start().await?;
    let ch = node.channel("web").await?;
    let sink = ch.sink(SinkOptions::new().attr("http", addr.to_string()).attr("load", load).attr("zone", "a"))?;
    Ok((node, sink, addr))
}

async fn get(client: &kecho_lb::http::HttpClient, lb: SocketAddr) -> Result<String> {
    let req = hyper::Request::get(format!("http://{lb}/")).body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let resp = client.request(req).await?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    let body = http_body_util::BodyExt::collect(resp.into_body()).await?.to_bytes();
    Ok(String::from_utf8(body.to_vec())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_discovered_spread_over_and_dropped_when_their_node_dies() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (n1, _s1, a1) = server(&reg, 0.2).await?;
    let (n2, _s2, a2) = server(&reg, 0.9).await?;
    let lb_node = Node::builder().registry_client(reg).heartbeat_timeout(HEARTBEAT).start().await?;
    let ch = lb_node.channel("web").await?;
    let balancer = Balancer::new(Mode::RoundRobin, false, None, 7);
    let keep = kecho::filter::ContentFilter::compile("zone == \"a\"")?;
    let _follow = follow(&balancer, ch, Some(keep), Duration::from_millis(50));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let lb = listener.local_addr()?;
    let _serve = balancer.spawn(listener);
    tokio::time::timeout(T, async {
        while balancer.pool().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("both servers in the pool")?;
    let loads: HashMap<SocketAddr, Option<f64>> = balancer.pool().iter().map(|b| (b.addr, b.load)).collect();
    assert_eq!(loads[&a1], Some(0.2));
    assert_eq!(loads[&a2], Some(0.9));

    let client = kecho_lb::http::client();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..10 {
        *seen.entry(get(&client, lb).await?).or_default() += 1;
    }
    assert_eq!(seen.get(&a1.to_string()), Some(&5), "{seen:?}");
    assert_eq!(seen.get(&a2.to_string()), Some(&5), "{seen:?}");

    // Server 1's node dies without a word: it leaves the pool within the heartbeat timeout (and a poll of the
    // balancer's follower).
    n1.kill();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(T, async {
        while balancer.pool().iter().any(|b| b.addr == a1) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("the dead server leaves the pool")?;
    assert!(started.elapsed() < HEARTBEAT * 2, "took {:?}", started.elapsed());
    for _ in 0..5 {
        assert_eq!(get(&client, lb).await?, a2.to_string());
    }
    drop(n2);
    Ok(())
}

#[tokio::test]
async fn an_empty_pool_answers_503_and_cookies_keep_a_client_on_its_server() -> Result<()> {
    let balancer = Balancer::new(Mode::RoundRobin, false, Some("lb".into()), 1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let lb = listener.local_addr()?;
    let _serve = balancer.spawn(listener);
    let client = kecho_lb::http::client();
    let empty = hyper::Request::get(format!("http://{lb}/")).body(http_body_util::Full::new(bytes::Bytes::new()))?;
    assert_eq!(client.request(empty).await?.status(), 503);

    let reg = RegistryClient::in_process_private();
    let (_n1, _s1, a1) = server(&reg, 0.0).await?;
    let (_n2, _s2, a2) = server(&reg, 0.0).await?;
    balancer.set_pool(vec![
        kecho_lb::balance::Backend { addr: a1, load: None },
        kecho_lb::balance::Backend { addr: a2, load: None },
    ]);
    let first = hyper::Request::get(format!("http://{lb}/")).body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let resp = client.request(first).await?;
    let cookie = resp.headers().get("set-cookie").context("a cookie")?.to_str()?.split(';').next().unwrap().to_owned();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await?.to_bytes();
    let home = String::from_utf8(body.to_vec())?;
    for _ in 0..6 {
        let req = hyper::Request::get(format!("http://{lb}/"))
            .header("cookie", &cookie)
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        let body = http_body_util::BodyExt::collect(client.request(req).await?.into_body()).await?.to_bytes();
        assert_eq!(String::from_utf8(body.to_vec())?, home);
    }
    Ok(())
}
