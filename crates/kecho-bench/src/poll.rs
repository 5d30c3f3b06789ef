//! Polling cost (Table 1): `Sink::try_recv` on an empty queue and on a non-empty one. kecho polls in user space (a
//! lock and a queue), so no system call is involved; KECho-UL needed two per poll.

use std::time::Instant;

use anyhow::{bail, Result};
use kecho::{Attrs, Node, Overflow, SinkOptions, TryRecvError};
use serde::Serialize;

use crate::pipe::fresh_name;
use crate::report::{fmt_ns, Section, Table};
use crate::util::{count, median, runtime};
use crate::BenchArgs;

#[derive(Debug, Serialize)]
struct Poll {
    empty_ns: f64,
    non_empty_ns: f64,
    calls: u64,
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let n = count(args, 200_000, 10);
    let rt = runtime()?;
    let poll = rt.block_on(async {
        let node = Node::start().await?;
        let ch = node.channel(&fresh_name("poll")).await?;
        let cap = n as usize + 1;
        let mut sink = ch.sink(SinkOptions::new().capacity(cap).overflow(Overflow::Block))?;
        let mut src = ch.source()?;
        let attrs = Attrs::new();
        let payload = [0u8; 100];
        // Five rounds each; the median resists a round interrupted by other work on the machine.
        let (mut empty, mut full) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t0 = Instant::now();
            for _ in 0..n {
                match sink.try_recv() {
                    Err(TryRecvError::Empty) => {}
                    other => bail!("expected an empty queue, got {other:?}"),
                }
            }
            empty.push(t0.elapsed().as_nanos() as f64 / n as f64);
            // The local source fills the queue without any network in between.
            for _ in 0..n {
                src.submit("e", &attrs, &payload).await?;
            }
            let t0 = Instant::now();
            for _ in 0..n {
                match sink.try_recv() {
                    Ok(ev) => {
                        std::hint::black_box(ev);
                    }
                    other => bail!("expected an event, got {other:?}"),
                }
            }
            full.push(t0.elapsed().as_nanos() as f64 / n as f64);
        }
        node.shutdown().await;
        Ok::<_, anyhow::Error>(Poll { empty_ns: median(&mut empty), non_empty_ns: median(&mut full), calls: n })
    })?;
    let mut s = Section::new("poll");
    let mut t = Table::new("polling cost (Table 1)", &["queue", "ns per try_recv", "system calls", "paper (KECho-UL)"]);
    t.row(vec!["empty".into(), fmt_ns(poll.empty_ns), "0".into(), "40 us (2 system calls)".into()]);
    t.row(vec!["non-empty".into(), fmt_ns(poll.non_empty_ns), "0".into(), "".into()]);
    s.tables.push(t);
    s.notes.push(format!(
        "median of 5 rounds of {n} calls; no system call is possible on this path (a mutex and a queue in memory; \
         the syscalls workload counts them for the whole process under load)."
    ));
    s.put("poll", &poll);
    Ok(s)
}
