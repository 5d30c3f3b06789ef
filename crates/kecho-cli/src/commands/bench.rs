//! `kecho bench`: the benchmark suite (crate kecho-bench).

pub use kecho_bench::BenchArgs as Args;

pub async fn run(a: Args) -> anyhow::Result<()> {
    kecho_bench::run(a).await
}
