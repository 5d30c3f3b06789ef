//! `kecho webfarm`: KECho's web-farm experiment, extended (crate kecho-lb).

pub use kecho_lb::WebfarmArgs as Args;

pub async fn run(a: Args) -> anyhow::Result<()> {
    kecho_lb::run_webfarm(a).await
}
