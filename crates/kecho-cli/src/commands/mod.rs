//! One module per `kecho` command: each has its arguments (`Args`, a clap struct or subcommand enum) and its `run`.

pub mod agent;
pub mod authority;
pub mod balance;
pub mod bench;
pub mod certs;
pub mod channels;
pub mod completions;
pub mod demo;
pub mod exec_agent;
pub mod filter;
pub mod flow;
pub mod grant;
pub mod identity;
pub mod logs;
pub mod man;
pub mod ps;
pub mod publish;
pub mod registry;
pub mod release;
pub mod reserve;
pub mod resources;
pub mod run;
pub mod sub;
pub mod top;
pub mod ui;
pub mod webfarm;
