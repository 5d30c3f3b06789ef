//! One module per `kecho` command: each has its arguments (`Args`, a clap struct or subcommand enum) and its `run`.

pub mod agent;
pub mod authority;
pub mod bench;
pub mod certs;
pub mod channels;
pub mod demo;
pub mod filter;
pub mod flow;
pub mod grant;
pub mod identity;
pub mod publish;
pub mod registry;
pub mod release;
pub mod reserve;
pub mod resources;
pub mod sub;
pub mod webfarm;
