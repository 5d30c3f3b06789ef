//! `kecho record`: a recorder member. It joins a channel as a sink and appends every event, once, to a segmented
//! log with a checksum per record in `--dir` (`kecho_store`), so the channel's history outlives its sources and the
//! recorder's own restarts. It answers replay requests on `CHANNEL.replay` (`kecho_store::replay`): sinks that come
//! back or join late get what it recorded. `--print` writes what is recorded as JSON lines and exits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{RecvError, SinkOptions};
use kecho_store::replay::{self, Request};
use kecho_store::{LogOptions, Recorded, Recorder};

use crate::attrs::recorded_json;
use crate::node_args::{node, open, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Channel name.
    channel: String,
    /// The recording's directory (created if missing; reopened and continued if it exists).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Print the recorded events as JSON lines, oldest first, and exit (no network; the recording is only read, so
    /// this may run beside its recorder).
    #[arg(long)]
    print: bool,
    /// A log segment rolls over at this many MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    segment_mb: u64,
    /// The oldest segments are deleted while the recording holds more than this many MiB (default: no bound).
    #[arg(long, value_name = "MIB")]
    max_mb: Option<u64>,
    /// Exit after recording this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Give up after this many seconds (default: never).
    #[arg(long)]
    timeout: Option<f64>,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(a: Args) -> Result<()> {
    if a.print {
        return print_recording(&a.dir);
    }
    anyhow::ensure!(a.segment_mb > 0, "--segment-mb must be at least 1");
    let opts = LogOptions { segment_bytes: a.segment_mb << 20, max_bytes: a.max_mb.map_or(u64::MAX, |m| m << 20) };
    let mut rec =
        Recorder::open(&a.dir, opts).with_context(|| format!("opening the recording in {}", a.dir.display()))?;
    if let Some((seg, bytes, why)) = &rec.opened().truncated {
        eprintln!(
            "kecho: {}: cut a torn record off its end ({bytes} byte(s): {why}); a write was interrupted, the whole \
             records before it are kept",
            seg.display()
        );
    }
    let node = node(&a.reg, &a.node, a.timeout).await?;
    let ch = open(&node, &a.channel, false).await?;
    let mut sink = ch.sink(SinkOptions::new().capacity(65_536))?;
    let rch = open(&node, &replay::channel_of(&a.channel), false).await?;
    let mut requests = rch.sink(
        SinkOptions::new()
            .types([replay::REQUEST])
            .attr(replay::RECORDER_ATTR, true)
            .attr(replay::RECORDER_ID_ATTR, rec.id().to_string())
            .attr(replay::RECORDER_VERSION_ATTR, replay::VERSION as i64)
            .capacity(1024),
    )?;
    let mut answers = rch.source()?;
    eprintln!(
        "kecho: recording {:?} into {} ({} event(s) so far; recording {})",
        a.channel,
        a.dir.display(),
        rec.opened().records,
        rec.id()
    );
    let deadline = a.timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs_f64(t));
    let (mut recorded, mut missed) = (0u64, 0u64);
    // Ctrl-C or SIGTERM (a service manager's stop) ends the recording cleanly, as `--count` does.
    let stop = super::agent::wait_for_stop();
    tokio::pin!(stop);
    let result = loop {
        if a.count.is_some_and(|n| recorded >= n) {
            break Ok(());
        }
        let next = async {
            // Events first: a request is answered with everything that arrived before it.
            tokio::select! {
                biased;
                r = sink.recv() => Some(Ok(r)),
                r = requests.recv() => Some(Err(r)),
                _ = &mut stop => None,
            }
        };
        let r = match deadline {
            Some(d) => match tokio::time::timeout_at(d, next).await {
                Ok(r) => r,
                Err(_) => break Err(anyhow::anyhow!("timed out with {recorded} event(s) recorded")),
            },
            None => next.await,
        };
        let r = match r {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(Ok(req))) => {
                rec.flush()?;
                match Request::from_attrs(req.attrs()) {
                    Ok(req) => {
                        match replay::serve(&mut rec, &mut answers, &req).await {
                            Ok(Some(n)) => eprintln!("kecho: replayed {n} event(s) to {}", req.id),
                            Ok(None) => {}
                            // Refused (a filter that does not compile): the requester was told why.
                            Err(e @ replay::ServeError::BadFilter { .. }) => eprintln!("kecho: {e}"),
                            Err(e) => break Err(e.into()),
                        }
                    }
                    Err(e) => {
                        if replay::refuse(&mut answers, rec.id(), req.attrs(), &e).await? {
                            eprintln!("kecho: refused a replay request: {e}");
                        } else {
                            eprintln!("kecho: ignored a replay request: {e}");
                        }
                    }
                }
                continue;
            }
            // A requester's requests lost, or its source gone (it left without a word): its own affair (it asks
            // again or gives up); the recorder goes on.
            Some(Err(Err(RecvError::Lagged(n)))) => {
                eprintln!("kecho: {n} replay request(s) lost");
                continue;
            }
            Some(Err(Err(RecvError::SourceLost(k)))) => {
                eprintln!("kecho: requester's source {k} is gone");
                continue;
            }
            Some(Err(Err(e))) => break Err(anyhow::anyhow!("replay requests: {e}")),
        };
        match r {
            None => break Ok(()),
            Some(Ok(ev)) => {
                if rec.record(&Recorded::of(&ev))? {
                    recorded += 1;
                }
                // Handed to the kernel once the burst is written: it then survives this process being killed.
                if sink.is_empty() {
                    rec.flush()?;
                }
            }
            Some(Err(RecvError::Lagged(n))) => {
                missed += n;
                eprintln!("kecho: the recording misses {n} event(s)");
            }
            Some(Err(RecvError::SourceLost(k))) => {
                eprintln!("kecho: source {k} is gone; an unknown number of its events are not recorded");
            }
            Some(Err(RecvError::Closed)) => break Err(anyhow::anyhow!("channel closed")),
            Some(Err(e)) => break Err(e.into()),
        }
    };
    // A clean close: the newest segment gets its index file, so that the next start reads no record.
    rec.close()?;
    eprintln!("kecho: recorded {recorded} event(s); {missed} missed");
    drop(sink);
    node.shutdown().await;
    result
}

/// `--print`: the recording in `dir`, read without writing to it. It may run beside the recorder, whose newest
/// record may be half written at any moment: opening the log as the recorder does would cut that tail off under the
/// recorder's feet (which then writes on at its own offset, past a hole) and would create a recording where there
/// is none.
fn print_recording(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("no recording in {}", dir.display()))?;
    let mut segments: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        let first = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".log"));
        if let Some(first) = first.and_then(|f| f.parse::<u64>().ok()) {
            segments.push((first, path));
        }
    }
    if segments.is_empty() {
        bail!("no recording in {} (no log segments)", dir.display());
    }
    segments.sort();
    let mut out = std::io::stdout().lock();
    let newest = segments.len() - 1;
    for (i, (_, path)) in segments.iter().enumerate() {
        let bytes = match std::fs::read(path) {
            // The recorder deleted it meanwhile (the oldest segments go beyond --max-mb).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && i < newest => continue,
            r => r.with_context(|| format!("reading {}", path.display()))?,
        };
        let scan = kecho_store::log::scan(&bytes);
        if let Some(why) = &scan.bad {
            if i < newest {
                bail!("{}: damaged at byte {}: {why}", path.display(), scan.valid);
            }
            eprintln!(
                "kecho: {}: the last {} byte(s) are not a whole record ({why}): a write in progress or an interrupted \
                 one (left as they are)",
                path.display(),
                bytes.len() - scan.valid
            );
        }
        for &(at, len) in &scan.records {
            let r = Recorded::decode(&bytes[at..at + len])
                .with_context(|| format!("{}: the record at byte {at} is not an event", path.display()))?;
            use std::io::Write;
            if writeln!(out, "{}", recorded_json(&r)).is_err() {
                return Ok(()); // standard output closed (piped into head)
            }
        }
    }
    Ok(())
}
