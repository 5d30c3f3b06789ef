//! `kecho webfarm`: KECho's web-farm experiment, extended (crate kecho-webfarm).

pub use kecho_webfarm::WebfarmArgs as Args;

pub async fn run(a: Args) -> anyhow::Result<()> {
    Ok(kecho_webfarm::run_webfarm(a).await?)
}
