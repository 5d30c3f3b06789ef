//! The SPEC language: `SOURCE [opts] ! TRANSFORM args ! ... ! SINK [opts] [SINK [opts] ...]`.
//!
//! A spec is a list of segments separated by `!`. The first segment is the source endpoint with its options, the
//! last one holds one or more sink endpoints (several sinks fan the flow out, each with its own queue), and every
//! segment between them is a transform: a name followed by its arguments. Words are separated by white space; a word
//! may be quoted with `'` or `"` (for `exec:'cmd args'`). Options are `name=value` words or bare flags (`resume`).
//! Parsing is pure: files named in the spec (keys, modules) are not read here.
//!
//! Every error carries the column and width of the offending word so that it can be shown with a caret
//! ([`SpecError`]'s `Display` prints the spec and the caret line).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A spec that does not parse, with the place it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The whole spec, as given.
    pub spec: String,
    /// Column (0-based, in characters) of the first character of the offending token.
    pub column: usize,
    /// Width of the offending token in characters (at least 1).
    pub width: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "bad flow spec: {} (column {})", self.message, self.column + 1)?;
        writeln!(f, "  {}", self.spec)?;
        write!(f, "  {}{}", " ".repeat(self.column), "^".repeat(self.width.max(1)))
    }
}

/// A word of the spec with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    column: usize,
    width: usize,
    /// True for `!` outside quotes.
    bang: bool,
}

/// What to do when a sink's queue is full (only with several sinks: a single sink is written inline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FullPolicy {
    /// Wait for room: this sink slows the source and every other sink down.
    Block,
    /// Drop the chunk for this sink only, counted in its `dropped_bytes`.
    Drop,
    /// Cut this sink off (it is notified and counted); the other sinks go on at their own pace.
    Detach,
}

/// A kernel or kecho object that data comes from or goes to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Endpoint {
    /// A file (source: read from the start; sink: created or truncated, or appended with `append`).
    File(PathBuf),
    /// Listen on a TCP address and take the first connection.
    TcpListen(String),
    /// Connect to a TCP address.
    TcpConnect(String),
    /// Listen on a Unix stream socket and take the first connection.
    UnixListen(PathBuf),
    /// Connect to a Unix stream socket.
    UnixConnect(PathBuf),
    /// Run a command with `sh -c`: as a source its stdout, as a sink its stdin.
    Exec(String),
    /// This process's stdin (as a source) or stdout (as a sink).
    Stdio,
    /// A kecho channel: as a source each event's payload, as a sink one event per chunk.
    Channel(String),
    /// A sink in the application itself (`app:NAME`): the function given to
    /// [`FlowBuilder::app_sink`](crate::FlowBuilder::app_sink) under that name sees the bytes. The application
    /// sees the data only where it asks to.
    App(String),
}

impl Endpoint {
    /// A TCP or Unix stream socket.
    pub fn is_socket(&self) -> bool {
        matches!(
            self,
            Endpoint::TcpListen(_) | Endpoint::TcpConnect(_) | Endpoint::UnixListen(_) | Endpoint::UnixConnect(_)
        )
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::File(p) => write!(f, "file:{}", p.display()),
            Endpoint::TcpListen(a) => write!(f, "tcp-listen:{a}"),
            Endpoint::TcpConnect(a) => write!(f, "tcp-connect:{a}"),
            Endpoint::UnixListen(p) => write!(f, "unix-listen:{}", p.display()),
            Endpoint::UnixConnect(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Exec(c) => write!(f, "exec:{c}"),
            Endpoint::Stdio => write!(f, "-"),
            Endpoint::Channel(c) => write!(f, "kecho:{c}"),
            Endpoint::App(n) => write!(f, "app:{n}"),
        }
    }
}

/// An endpoint with its options.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EndpointSpec {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Alternate destinations tried in order when this one fails for good (rung 2 of the exception ladder).
    pub alternates: Vec<Endpoint>,
    /// How many times a transient fault (connection refused or dropped) is retried before redirecting.
    pub retries: u32,
    /// Resume a dropped connection at the offset the peer reports (`resume`; see docs/FLOWS.md).
    pub resume: bool,
    /// Append to a file sink instead of truncating it.
    pub append: bool,
    /// Queue of this sink in bytes when the flow fans out.
    pub queue: usize,
    /// What a full sink queue does.
    pub full: FullPolicy,
    /// Event type of a kecho channel sink.
    pub event_type: String,
    /// Disable the zero-copy path (`copy`): for measurements and for files that lie about splice support.
    pub force_copy: bool,
    /// Write a file sink with `O_DIRECT` from aligned user buffers (`direct`): one copy per byte (the receive) and
    /// none into the page cache; the unaligned end goes through the page cache. Untransformed flows with one file
    /// sink only.
    pub direct: bool,
    /// Send a file to this socket sink with `sendfile` rather than `splice` through the flow's own pipe
    /// (`sendfile`): the same zero-copy move through the kernel's internal pipe of 64 KiB, for comparing the two.
    /// Socket sinks only (TCP or Unix).
    pub sendfile: bool,
}

impl EndpointSpec {
    /// An endpoint with default options.
    pub fn new(endpoint: Endpoint) -> Self {
        EndpointSpec {
            endpoint,
            alternates: Vec::new(),
            retries: 3,
            resume: false,
            append: false,
            queue: 16 << 20,
            full: FullPolicy::Detach,
            event_type: "flow.data".into(),
            force_copy: false,
            direct: false,
            sendfile: false,
        }
    }
}

/// Compression codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Codec {
    /// Zstandard frames.
    Zstd,
    /// LZ4 frames.
    Lz4,
}

/// How many copies of a stage run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Replicas {
    /// Exactly this many (1: inline in the flow's thread).
    Fixed(usize),
    /// The scheduler decides from the stage's measured load.
    Auto,
}

/// A transform stage as written in a spec.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum TransformSpec {
    /// AES-256-GCM encryption into the record format of [`crate::record`].
    Encrypt {
        /// File with the key (32 raw bytes or 64 hex digits).
        key: PathBuf,
        /// Largest plaintext per record.
        record: usize,
    },
    /// AES-256-GCM decryption of the record format.
    Decrypt {
        /// File with the key.
        key: PathBuf,
    },
    /// Compression (each chunk an independent frame).
    Compress {
        /// Codec.
        codec: Codec,
        /// Level (zstd only).
        level: i32,
    },
    /// Decompression of concatenated frames.
    Decompress {
        /// Codec.
        codec: Codec,
    },
    /// CRC-32 of the stream (data passes unchanged; the sum shows in the stats).
    Checksum,
    /// A sandboxed WebAssembly transform (ABI in docs/FLOWS.md).
    Wasm {
        /// The module (text or binary format).
        module: PathBuf,
        /// Fuel per call.
        fuel: u64,
        /// Largest linear memory in bytes.
        memory: usize,
    },
}

impl TransformSpec {
    /// The stage's name as shown in stats.
    pub fn name(&self) -> String {
        match self {
            TransformSpec::Encrypt { .. } => "encrypt aes-256-gcm".into(),
            TransformSpec::Decrypt { .. } => "decrypt aes-256-gcm".into(),
            TransformSpec::Compress { codec, .. } => format!("compress {}", codec_name(*codec)),
            TransformSpec::Decompress { codec } => format!("decompress {}", codec_name(*codec)),
            TransformSpec::Checksum => "checksum crc32".into(),
            TransformSpec::Wasm { .. } => "wasm".into(),
        }
    }
}

fn codec_name(c: Codec) -> &'static str {
    match c {
        Codec::Zstd => "zstd",
        Codec::Lz4 => "lz4",
    }
}

/// A transform with its replication.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageSpec {
    /// The transform.
    pub transform: TransformSpec,
    /// Replicas.
    pub replicas: Replicas,
}

/// The size of the buffers a transformed flow reads into (`chunk=`): 1 MiB, which cost a receiving and decrypting
/// flow about a fifth less CPU than 256 KiB (fewer reads, wake-ups and hand-overs per byte; docs/FLOWS.md).
pub const DEFAULT_CHUNK: usize = 1 << 20;

/// A parsed flow.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlowSpec {
    /// Where data comes from.
    pub source: EndpointSpec,
    /// Transforms in order.
    pub stages: Vec<StageSpec>,
    /// Where data goes (several: fan-out).
    pub sinks: Vec<EndpointSpec>,
    /// Scheduling priority (higher gets more of a shared budget), 1 by default.
    pub priority: u32,
    /// Rate limit in bytes per second.
    pub rate: Option<u64>,
    /// Read size of the source in bytes.
    pub chunk: usize,
}

/// Parses a spec.
pub fn parse(spec: &str) -> Result<FlowSpec, SpecError> {
    let tokens = tokenize(spec)?;
    let err =
        |t: &Token, msg: String| SpecError { spec: spec.to_owned(), column: t.column, width: t.width, message: msg };
    let mut segments: Vec<Vec<Token>> = vec![Vec::new()];
    for t in tokens {
        if t.bang {
            if segments.last().is_some_and(|s| s.is_empty()) {
                return Err(err(&t, "empty segment before `!`".into()));
            }
            segments.push(Vec::new());
        } else if let Some(seg) = segments.last_mut() {
            seg.push(t);
        }
    }
    if segments.last().is_some_and(|s| s.is_empty()) {
        let width = spec.chars().count();
        return Err(SpecError {
            spec: spec.to_owned(),
            column: width.saturating_sub(1),
            width: 1,
            message: if width == 0 { "empty spec".into() } else { "expected a sink after the last `!`".into() },
        });
    }
    if segments.len() < 2 {
        let t = &segments[0][0];
        return Err(err(t, "a flow needs a source and a sink: `SOURCE ! SINK`".into()));
    }
    let n = segments.len();
    let mut flow = FlowSpec {
        source: EndpointSpec::new(Endpoint::Stdio),
        stages: Vec::new(),
        sinks: Vec::new(),
        priority: 1,
        rate: None,
        chunk: DEFAULT_CHUNK,
    };
    // Source.
    let mut srcs = parse_endpoints(spec, &segments[0], Some(&mut flow))?;
    if srcs.len() != 1 {
        let t = segments[0].iter().rfind(|t| endpoint_word(&t.text)).unwrap_or(&segments[0][0]);
        return Err(err(t, "a flow has exactly one source".into()));
    }
    flow.source = srcs.remove(0);
    for seg in &segments[1..n - 1] {
        flow.stages.push(parse_stage(spec, seg)?);
    }
    flow.sinks = parse_endpoints(spec, &segments[n - 1], None)?;
    Ok(flow)
}

fn endpoint_word(w: &str) -> bool {
    if w == "-" || w == "stdio" {
        return true;
    }
    match (w.find(':'), w.find('=')) {
        (Some(c), Some(e)) => c < e,
        (Some(_), None) => true,
        _ => false,
    }
}

fn tokenize(spec: &str) -> Result<Vec<Token>, SpecError> {
    let chars: Vec<char> = spec.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        if chars[i] == '!' {
            out.push(Token { text: "!".into(), column: i, width: 1, bang: true });
            i += 1;
            continue;
        }
        let start = i;
        let mut text = String::new();
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '!' {
            let c = chars[i];
            if c == '\'' || c == '"' {
                let open = i;
                i += 1;
                while i < chars.len() && chars[i] != c {
                    text.push(chars[i]);
                    i += 1;
                }
                if i == chars.len() {
                    return Err(SpecError {
                        spec: spec.to_owned(),
                        column: open,
                        width: 1,
                        message: format!("unterminated quote {c}"),
                    });
                }
                i += 1;
            } else {
                text.push(c);
                i += 1;
            }
        }
        out.push(Token { text, column: start, width: i - start, bang: false });
    }
    if out.is_empty() {
        return Err(SpecError { spec: spec.to_owned(), column: 0, width: 1, message: "empty spec".into() });
    }
    Ok(out)
}

fn parse_endpoint(spec: &str, t: &Token) -> Result<Endpoint, SpecError> {
    let err = |msg: String| SpecError { spec: spec.to_owned(), column: t.column, width: t.width, message: msg };
    let w = t.text.as_str();
    if w == "-" || w == "stdio" {
        return Ok(Endpoint::Stdio);
    }
    let Some((scheme, rest)) = w.split_once(':') else {
        return Err(err(format!(
            "expected an endpoint (file:, tcp-listen:, tcp-connect:, unix:, exec:, kecho:), found `{w}`"
        )));
    };
    if rest.is_empty() {
        return Err(err(format!("`{scheme}:` needs an address or path")));
    }
    let need_port = |a: &str| -> Result<String, SpecError> {
        match a.rsplit_once(':') {
            Some((_, p)) if p.parse::<u16>().is_ok() => Ok(a.to_owned()),
            _ => Err(err(format!("`{a}` is not HOST:PORT"))),
        }
    };
    Ok(match scheme {
        "file" => Endpoint::File(rest.into()),
        "tcp-listen" => Endpoint::TcpListen(need_port(rest)?),
        "tcp-connect" | "tcp" => Endpoint::TcpConnect(need_port(rest)?),
        "unix-listen" => Endpoint::UnixListen(rest.into()),
        "unix" => Endpoint::UnixConnect(rest.into()),
        "exec" => Endpoint::Exec(rest.to_owned()),
        "kecho" => Endpoint::Channel(rest.to_owned()),
        "app" => Endpoint::App(rest.to_owned()),
        _ => return Err(err(format!("unknown endpoint kind `{scheme}:`"))),
    })
}

fn parse_endpoints(spec: &str, seg: &[Token], mut flow: Option<&mut FlowSpec>) -> Result<Vec<EndpointSpec>, SpecError> {
    let mut out: Vec<EndpointSpec> = Vec::new();
    for t in seg {
        let err = |msg: String| SpecError { spec: spec.to_owned(), column: t.column, width: t.width, message: msg };
        if endpoint_word(&t.text) {
            out.push(EndpointSpec::new(parse_endpoint(spec, t)?));
            continue;
        }
        let Some(ep) = out.last_mut() else {
            return Err(err(format!("expected an endpoint, found `{}`", t.text)));
        };
        let (k, v) = t.text.split_once('=').map_or((t.text.as_str(), None), |(k, v)| (k, Some(v)));
        let need = |v: Option<&'_ str>| -> Result<String, SpecError> {
            v.map(str::to_owned).ok_or_else(|| err(format!("`{k}` needs a value: `{k}=...`")))
        };
        match k {
            "alt" => {
                let v = need(v)?;
                let sub = Token { text: v, column: t.column + 4, width: t.width.saturating_sub(4), bang: false };
                ep.alternates.push(parse_endpoint(spec, &sub)?);
            }
            "retries" => ep.retries = need(v)?.parse().map_err(|_| err("retries is a number".into()))?,
            "resume" => ep.resume = true,
            "append" => ep.append = true,
            "copy" => ep.force_copy = true,
            "direct" => {
                if !matches!(ep.endpoint, Endpoint::File(_)) {
                    return Err(err(format!("`direct` is for file sinks, not {}", ep.endpoint)));
                }
                ep.direct = true;
            }
            "sendfile" => {
                if !ep.endpoint.is_socket() {
                    return Err(err(format!("`sendfile` is for socket sinks, not {}", ep.endpoint)));
                }
                ep.sendfile = true;
            }
            "queue" => ep.queue = parse_size(&need(v)?).ok_or_else(|| err("queue is a size like 16M".into()))?,
            "full" => {
                ep.full = match need(v)?.as_str() {
                    "block" => FullPolicy::Block,
                    "drop" => FullPolicy::Drop,
                    "detach" => FullPolicy::Detach,
                    other => return Err(err(format!("full is block, drop or detach, not `{other}`"))),
                }
            }
            "type" => ep.event_type = need(v)?,
            "priority" | "rate" | "chunk" if flow.is_some() => {
                let f = flow.as_deref_mut().ok_or_else(|| err("flow option on a sink".into()))?;
                let v = need(v)?;
                let v = v.as_str();
                match k {
                    "priority" => {
                        f.priority =
                            v.parse().ok().filter(|p| *p > 0).ok_or_else(|| err("priority is a number >= 1".into()))?
                    }
                    "rate" => {
                        f.rate = Some(
                            parse_size(v).filter(|r| *r > 0).ok_or_else(|| err("rate is bytes/s like 10M".into()))?
                                as u64,
                        )
                    }
                    _ => {
                        f.chunk = parse_size(v)
                            .filter(|c| (4096..=64 << 20).contains(c))
                            .ok_or_else(|| err("chunk is a size between 4K and 64M".into()))?
                    }
                }
            }
            "priority" | "rate" | "chunk" => return Err(err(format!("`{k}` is an option of the source"))),
            _ => return Err(err(format!("unknown endpoint option `{k}`"))),
        }
    }
    Ok(out)
}

fn parse_stage(spec: &str, seg: &[Token]) -> Result<StageSpec, SpecError> {
    let head = &seg[0];
    let err_at =
        |t: &Token, msg: String| SpecError { spec: spec.to_owned(), column: t.column, width: t.width, message: msg };
    let mut positional: Vec<&Token> = Vec::new();
    let mut opts: Vec<(&str, &str, &Token)> = Vec::new();
    for t in &seg[1..] {
        match t.text.split_once('=') {
            Some((k, v)) => opts.push((k, v, t)),
            None => positional.push(t),
        }
    }
    let mut replicas = Replicas::Fixed(1);
    let mut used = vec![false; opts.len()];
    let mut opt = |name: &str| -> Option<(&str, &Token)> {
        let i = opts.iter().position(|(k, _, _)| *k == name)?;
        used[i] = true;
        Some((opts[i].1, opts[i].2))
    };
    if let Some((v, t)) = opt("replicas") {
        replicas = if v == "auto" {
            Replicas::Auto
        } else {
            Replicas::Fixed(
                v.parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| err_at(t, "replicas is 1..64 or auto".into()))?,
            )
        };
    }
    let algo = |positional: &[&Token]| -> Result<(), SpecError> {
        match positional.first() {
            Some(t) if t.text == "aes-256-gcm" => Ok(()),
            Some(t) => Err(err_at(t, format!("unknown cipher `{}` (supported: aes-256-gcm)", t.text))),
            None => Err(err_at(head, format!("`{}` needs a cipher: aes-256-gcm", head.text))),
        }
    };
    let codec = |positional: &[&Token]| -> Result<Codec, SpecError> {
        match positional.first() {
            Some(t) if t.text == "zstd" => Ok(Codec::Zstd),
            Some(t) if t.text == "lz4" => Ok(Codec::Lz4),
            Some(t) => Err(err_at(t, format!("unknown codec `{}` (supported: zstd, lz4)", t.text))),
            None => Err(err_at(head, format!("`{}` needs a codec: zstd or lz4", head.text))),
        }
    };
    let max_pos;
    let transform = match head.text.as_str() {
        "encrypt" | "decrypt" => {
            algo(&positional)?;
            max_pos = 1;
            let (key, _) = opt("key").ok_or_else(|| err_at(head, format!("`{}` needs key=FILE", head.text)))?;
            let key = PathBuf::from(key);
            if head.text == "encrypt" {
                let record = match opt("record") {
                    Some((v, t)) => parse_size(v)
                        .filter(|r| (1..=crate::record::MAX_RECORD).contains(r))
                        .ok_or_else(|| err_at(t, "record is a size from 1 to 16M".into()))?,
                    None => 64 << 10,
                };
                TransformSpec::Encrypt { key, record }
            } else {
                TransformSpec::Decrypt { key }
            }
        }
        "compress" => {
            let codec = codec(&positional)?;
            max_pos = 1;
            let level = match opt("level") {
                Some((v, t)) => v
                    .parse()
                    .ok()
                    .filter(|l| (-7..=22).contains(l))
                    .ok_or_else(|| err_at(t, "level is -7..22".into()))?,
                None => 3,
            };
            TransformSpec::Compress { codec, level }
        }
        "decompress" => {
            max_pos = 1;
            TransformSpec::Decompress { codec: codec(&positional)? }
        }
        "checksum" => {
            max_pos = 1;
            if let Some(t) = positional.first().filter(|t| t.text != "crc32") {
                return Err(err_at(t, format!("unknown checksum `{}` (supported: crc32)", t.text)));
            }
            TransformSpec::Checksum
        }
        "wasm" => {
            max_pos = 0;
            let (module, _) = opt("module").ok_or_else(|| err_at(head, "`wasm` needs module=FILE".into()))?;
            let fuel = match opt("fuel") {
                Some((v, t)) => {
                    v.parse().ok().filter(|f| *f > 0).ok_or_else(|| err_at(t, "fuel is a number".into()))?
                }
                None => 10_000_000,
            };
            let memory = match opt("memory") {
                Some((v, t)) => parse_size(v).ok_or_else(|| err_at(t, "memory is a size like 16M".into()))?,
                None => 16 << 20,
            };
            TransformSpec::Wasm { module: module.into(), fuel, memory }
        }
        other => {
            let hint = if endpoint_word(other) { " (an endpoint can only be the first or last segment)" } else { "" };
            return Err(err_at(
                head,
                format!("unknown transform `{other}` (encrypt, decrypt, compress, decompress, checksum, wasm){hint}"),
            ));
        }
    };
    if let Some(t) = positional.get(max_pos) {
        return Err(err_at(t, format!("unexpected argument `{}`", t.text)));
    }
    if let Some(i) = used.iter().position(|u| !u) {
        let (k, _, t) = opts[i];
        return Err(err_at(t, format!("unknown option `{k}` of `{}`", head.text)));
    }
    Ok(StageSpec { transform, replicas })
}

/// Parses `1234`, `64K`, `16M`, `1G` (binary multiples; a trailing `B`, `iB` is accepted).
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1usize << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

/// A default retry backoff: 50 ms doubled per attempt, at most 2 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempt.min(10)).min(2000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(spec: &str, col: usize, word: &str, msg: &str) {
        let e = parse(spec).expect_err(spec);
        assert_eq!(e.column, col, "{e}");
        let got: String = spec.chars().skip(e.column).take(e.width).collect();
        assert_eq!(got, word, "{e}");
        assert!(e.message.contains(msg), "{e}");
    }

    #[test]
    fn full_pipeline() {
        let f = parse(
            "tcp-listen:0.0.0.0:9000 rate=10M priority=3 ! decrypt aes-256-gcm key=k.bin replicas=2 ! file:/data/out",
        )
        .unwrap();
        assert_eq!(f.source.endpoint, Endpoint::TcpListen("0.0.0.0:9000".into()));
        assert_eq!(f.rate, Some(10 << 20));
        assert_eq!(f.priority, 3);
        assert_eq!(f.stages.len(), 1);
        assert_eq!(f.stages[0].transform, TransformSpec::Decrypt { key: "k.bin".into() });
        assert_eq!(f.stages[0].replicas, Replicas::Fixed(2));
        assert_eq!(f.sinks[0].endpoint, Endpoint::File("/data/out".into()));
    }

    #[test]
    fn fan_out_alternates_and_quotes() {
        let f = parse(
            "exec:'cat /etc/hostname' ! compress zstd level=5 ! checksum ! tcp-connect:10.0.0.1:9 alt=tcp:10.0.0.2:9 retries=1 resume file:x full=drop queue=1M",
        )
        .unwrap();
        assert_eq!(f.source.endpoint, Endpoint::Exec("cat /etc/hostname".into()));
        assert_eq!(f.stages[0].transform, TransformSpec::Compress { codec: Codec::Zstd, level: 5 });
        assert_eq!(f.stages[1].transform, TransformSpec::Checksum);
        assert_eq!(f.sinks.len(), 2);
        assert_eq!(f.sinks[0].alternates, vec![Endpoint::TcpConnect("10.0.0.2:9".into())]);
        assert_eq!(f.sinks[0].retries, 1);
        assert!(f.sinks[0].resume);
        assert_eq!(f.sinks[1].full, FullPolicy::Drop);
        assert_eq!(f.sinks[1].queue, 1 << 20);
    }

    #[test]
    fn errors_point_at_the_token() {
        check_err("file:a ! decryp aes-256-gcm key=k ! file:b", 9, "decryp", "unknown transform");
        check_err("file:a ! decrypt aes-128-gcm key=k ! file:b", 17, "aes-128-gcm", "unknown cipher");
        check_err("file:a ! decrypt aes-256-gcm ! file:b", 9, "decrypt", "key=FILE");
        check_err("file:a ! compress zstd lvl=3 ! file:b", 23, "lvl=3", "unknown option");
        check_err("tcp-listen:9000 ! file:b", 0, "tcp-listen:9000", "HOST:PORT");
        check_err("file:a ! ! file:b", 9, "!", "empty segment");
        check_err("file:a ! file:b full=maybe", 16, "full=maybe", "block, drop or detach");
        check_err("file:a", 0, "file:a", "source and a sink");
        check_err("file:a !", 7, "!", "sink after");
        check_err("ftp:x ! file:b", 0, "ftp:x", "unknown endpoint kind");
        check_err("exec:'ls ! file:b", 5, "'", "unterminated");
        check_err("file:a ! file:b priority=2", 16, "priority=2", "option of the source");
        let e = parse("file:a ! decryp x ! file:b").unwrap_err().to_string();
        assert!(e.ends_with("\n           ^^^^^^"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("7"), Some(7));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "[ -~]{0,80}") {
            let _ = parse(&s);
        }
    }
}
