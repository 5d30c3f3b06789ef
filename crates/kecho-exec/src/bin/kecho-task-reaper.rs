//! The stand-alone task reaper (see `kecho_exec::reaper`), for programs that run a task supervisor without serving
//! the reaper themselves (this crate's tests and examples). The `kecho` binary serves it itself.

fn main() {
    kecho_exec::reaper::serve_if_invoked();
    eprintln!("{}: runs only as the task reaper of a kecho agent", kecho_exec::reaper::BIN);
    std::process::exit(2);
}
