//! Runs the web-farm experiment until `kecho webfarm` is wired: `cargo run --release -p kecho-webfarm --example webfarm
//! -- --time-scale 10 --out webfarm-out` (`--demo` for the short version).

use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    /// Run the short version of `kecho demo`.
    #[arg(long)]
    demo: bool,
    #[command(flatten)]
    args: kecho_webfarm::WebfarmArgs,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result =
        if cli.demo { kecho_webfarm::demo_webfarm().await } else { kecho_webfarm::run_webfarm(cli.args).await };
    if let Err(e) = result {
        eprintln!("kecho webfarm: {e:#}");
        std::process::exit(1);
    }
}
