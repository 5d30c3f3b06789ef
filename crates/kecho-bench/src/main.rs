//! `kecho-bench`: the benchmark suite on its own, until `kecho bench` runs it.
//! `cargo run --release -p kecho-bench -- all` (see BENCHMARKS.md).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "kecho-bench", about = "kecho's benchmark suite: Markdown tables on stdout, JSON and SVG in --out")]
struct Cli {
    #[command(flatten)]
    args: kecho_bench::BenchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match kecho_bench::run_blocking(cli.args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kecho-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
