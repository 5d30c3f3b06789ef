//! Application files: one TOML file per application, one `[component.NAME]` table per component.
//!
//! ```toml
//! name = "shop"                 # optional: the file's stem otherwise
//! on_failure = "restart"        # the application's default failure policy
//!
//! [component.db]
//! cmd = "exec postgres -D data" # a shell command line, or an argv array, or `artifact = "sha256:..."`
//! require = "os == 'linux'"     # hardware prerequisites: a reservation spec
//! cpus = 2
//! mem = "2G"
//! port = 5432                   # the address dependents are handed
//! ready = { tcp = 5432 }        # or { cmd = "pg_isready" }; `timeout` in seconds
//!
//! [component.web]
//! cmd = ["./web", "--listen", "0.0.0.0:8080"]
//! after = ["db"]                # software prerequisites
//! on_failure = "stop-dependents"
//! ```
//!
//! Parsing is strict: an unknown key is an error (a misspelt `ater` must not silently drop a dependency), and every
//! error names the line it comes from. Dependency checks (missing components, cycles) are in [`crate::graph`], which
//! [`AppSpec::parse`] runs, so a parsed application is always a valid graph.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::graph::{AppGraph, GraphError};
use crate::place::ReservationSpec;
use crate::repo::Digest;

/// How long a readiness check may take when the file does not say.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed, checked application.
#[derive(Debug, Clone, PartialEq)]
pub struct AppSpec {
    /// The application's name: the file's `name`, else its stem.
    pub name: AppName,
    /// The components by name.
    pub components: BTreeMap<ComponentName, ComponentSpec>,
    /// The dependency graph over `components`.
    pub graph: AppGraph,
}

/// An application's name: letters, digits, `-`, `_` and `.`, 1 to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AppName(String);

/// A component's name: lowercase letters, digits, `-` and `_`, 1 to 64 characters, starting with a letter (it
/// becomes part of environment variable names).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ComponentName(String);

/// One component of an application.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentSpec {
    /// Its name.
    pub name: ComponentName,
    /// What runs.
    pub run: Run,
    /// Its hardware prerequisites.
    pub reservation: ReservationSpec,
    /// The components it needs started and ready first.
    pub after: Vec<ComponentName>,
    /// The 1-based line of each entry of `after`, for errors that name it.
    pub after_lines: Vec<usize>,
    /// The port it serves on, handed to its dependents as part of its address.
    pub port: Option<u16>,
    /// How to tell that it is ready; without one it is ready once started.
    pub readiness: Option<Readiness>,
    /// What happens when it fails.
    pub on_failure: FailurePolicy,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// The 1-based line of its table in the file.
    pub line: usize,
}

/// What a component runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Run {
    /// A command line run by `/bin/sh -c`.
    Shell(String),
    /// A program and its arguments, run directly.
    Argv(Vec<String>),
    /// An executable artifact from the component repository, with its arguments.
    Artifact {
        /// The artifact's content hash.
        digest: Digest,
        /// Its arguments.
        args: Vec<String>,
    },
}

/// A readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// What is checked.
    pub check: ReadyCheck,
    /// How long the component may take to become ready before it counts as failed.
    pub timeout: Duration,
}

/// What a readiness check tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReadyCheck {
    /// A TCP connect to this port on the component's node succeeds.
    Tcp(u16),
    /// This shell command, run on the component's node, exits 0.
    Command(String),
}

/// What happens when a component fails (its dependents are told in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Restart it in place, on the same node.
    #[default]
    Restart,
    /// Start it again on another fitting node.
    Replace,
    /// Leave it failed and stop every component that depends on it, directly or not.
    StopDependents,
}

/// Why an application file is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not have the expected shape.
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is well-formed TOML but not acceptable.
    #[error("line {line}: {message}")]
    Invalid {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The application has no name: none in the file and no file stem to take it from.
    #[error("the application has no name: set `name = \"...\"`")]
    NoName,
    /// The application has no components.
    #[error("the application has no components: add a [component.NAME] table")]
    Empty,
    /// The dependency graph is refused.
    #[error(transparent)]
    Graph(#[from] GraphError),
}

impl AppSpec {
    /// Reads and parses an application file; the name defaults to the file's stem.
    pub fn load(path: &Path) -> Result<AppSpec, AppError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AppError::Read { path: path.display().to_string(), source })?;
        let stem = path.file_stem().and_then(|s| s.to_str());
        AppSpec::parse(&text, stem)
    }

    /// Parses an application from TOML text; `default_name` is used when the text sets no `name`.
    pub fn parse(text: &str, default_name: Option<&str>) -> Result<AppSpec, AppError> {
        let lines = LineIndex::new(text);
        let raw: RawApp = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| lines.position(s.start)).unwrap_or((1, 1));
            AppError::Syntax { line, column, message: e.message().trim().to_string() }
        })?;
        let name = match raw.name {
            Some(n) => {
                let span = n.span();
                AppName::from_str(n.get_ref()).map_err(|m| lines.invalid(&span, m.to_string()))?
            }
            None => {
                let stem = default_name.ok_or(AppError::NoName)?;
                AppName::from_str(stem).map_err(|m| AppError::Invalid {
                    line: 1,
                    message: format!("the file's stem cannot name the application ({m}): set `name = \"...\"`"),
                })?
            }
        };
        let default_policy = raw.on_failure.unwrap_or_default();
        if raw.component.is_empty() {
            return Err(AppError::Empty);
        }
        let mut components = BTreeMap::new();
        for (key, table) in raw.component {
            let span = table.span();
            let name =
                ComponentName::from_str(&key).map_err(|m| lines.invalid(&span, format!("[component.{key}]: {m}")))?;
            let spec = table.into_inner().into_spec(name.clone(), default_policy, lines.line(span.start), &lines)?;
            components.insert(name, spec);
        }
        let graph = AppGraph::build(&components)?;
        Ok(AppSpec { name, components, graph })
    }

    /// The environment variables that hand a component its dependencies' addresses, given where each dependency
    /// runs (`host` per component): `KECHO_DEP_<NAME>=host:port` (or just the host without a port), `<NAME>` being
    /// the component name in upper case with `-` as `_`. Also `KECHO_APP` and `KECHO_COMPONENT`.
    pub fn dependency_env(
        &self,
        component: &ComponentName,
        host_of: &dyn Fn(&ComponentName) -> Option<String>,
    ) -> Vec<(String, String)> {
        let mut env = vec![
            ("KECHO_APP".to_string(), self.name.to_string()),
            ("KECHO_COMPONENT".to_string(), component.to_string()),
        ];
        if let Some(spec) = self.components.get(component) {
            for dep in &spec.after {
                let Some(host) = host_of(dep) else { continue };
                let port = self.components.get(dep).and_then(|d| d.port);
                let value = match port {
                    Some(p) => format!("{host}:{p}"),
                    None => host,
                };
                env.push((format!("KECHO_DEP_{}", dep.env_key()), value));
            }
        }
        env
    }
}

/// A text that is not a valid application or component name (the message says what is allowed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadName(String);

/// Replaces `${NAME}` in a command's argument with the value kecho hands the component (`KECHO_DEP_DB`,
/// `KECHO_APP`, ...), so that an argv needs no shell to use its dependencies' addresses. A name kecho does not set,
/// and a `$` not followed by `{NAME}`, stay as written.
pub fn expand_vars(arg: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                match vars.iter().find(|(k, _)| k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => out.push_str(&rest[start..start + 2 + end + 1]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

impl AppName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AppName {
    type Err = BadName;

    fn from_str(s: &str) -> Result<AppName, BadName> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with('.');
        if ok {
            Ok(AppName(s.to_string()))
        } else {
            Err(BadName(format!(
                "`{s}` is not an application name (letters, digits, `-`, `_`, `.`; 1 to 64 characters)"
            )))
        }
    }
}

impl TryFrom<String> for AppName {
    type Error = BadName;

    fn try_from(s: String) -> Result<AppName, BadName> {
        s.parse()
    }
}

impl From<AppName> for String {
    fn from(n: AppName) -> String {
        n.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ComponentName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as it appears in environment variable names: upper case, `-` as `_`.
    pub fn env_key(&self) -> String {
        self.0.to_ascii_uppercase().replace('-', "_")
    }
}

impl FromStr for ComponentName {
    type Err = BadName;

    fn from_str(s: &str) -> Result<ComponentName, BadName> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'));
        if ok {
            Ok(ComponentName(s.to_string()))
        } else {
            Err(BadName(format!(
                "`{s}` is not a component name (a lowercase letter, then lowercase letters, digits, `-`, `_`; at most 64)"
            )))
        }
    }
}

impl TryFrom<String> for ComponentName {
    type Error = BadName;

    fn try_from(s: String) -> Result<ComponentName, BadName> {
        s.parse()
    }
}

impl From<ComponentName> for String {
    fn from(n: ComponentName) -> String {
        n.0
    }
}

impl fmt::Display for ComponentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailurePolicy::Restart => "restart",
            FailurePolicy::Replace => "replace",
            FailurePolicy::StopDependents => "stop-dependents",
        })
    }
}

/// A byte count that [`parse_bytes`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ByteCountError {
    /// The unit is not K, M, G or T (with an optional `i` and `B`).
    #[error("`{text}`: unknown unit `{unit}` (use K, M, G or T)")]
    UnknownUnit {
        /// The text given.
        text: String,
        /// Its unit.
        unit: String,
    },
    /// The number does not parse.
    #[error("`{text}` is not a byte count")]
    NotANumber {
        /// The text given.
        text: String,
    },
    /// Less than one byte, or more than 2^64.
    #[error("`{text}` is not a usable byte count")]
    OutOfRange {
        /// The text given.
        text: String,
    },
}

/// Parses a byte count: an integer, or a number with a unit (`K`, `M`, `G`, `T`, powers of 1024, with an optional
/// `i` and `B`: `512M`, `2GiB`, `1.5G`).
pub fn parse_bytes(s: &str) -> Result<u64, ByteCountError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult: u64 = match unit.trim_end_matches('B').trim_end_matches('i').to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(ByteCountError::UnknownUnit { text: s.to_owned(), unit: unit.to_owned() }),
    };
    let value: f64 = num.parse().map_err(|_| ByteCountError::NotANumber { text: s.to_owned() })?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(ByteCountError::OutOfRange { text: s.to_owned() });
    }
    Ok(bytes as u64)
}

// The file's shape as serde sees it; spans are kept where a later check must name a line.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: Option<Spanned<String>>,
    on_failure: Option<FailurePolicy>,
    #[serde(default)]
    component: BTreeMap<String, Spanned<RawComponent>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    cmd: Option<Spanned<RawCmd>>,
    artifact: Option<Spanned<String>>,
    #[serde(default)]
    args: Vec<String>,
    require: Option<String>,
    rank: Option<String>,
    cpus: Option<Spanned<f64>>,
    mem: Option<Spanned<RawBytes>>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    port: Option<u16>,
    ready: Option<Spanned<RawReady>>,
    on_failure: Option<FailurePolicy>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCmd {
    Line(String),
    Argv(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawBytes {
    Count(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReady {
    tcp: Option<u16>,
    cmd: Option<String>,
    timeout: Option<f64>,
}

impl RawComponent {
    fn into_spec(
        self,
        name: ComponentName,
        default_policy: FailurePolicy,
        line: usize,
        lines: &LineIndex,
    ) -> Result<ComponentSpec, AppError> {
        let run = match (self.cmd, self.artifact) {
            (Some(_), Some(a)) => {
                return Err(
                    lines.invalid(&a.span(), format!("component `{name}` has both `cmd` and `artifact`: choose one"))
                )
            }
            (None, None) => {
                return Err(AppError::Invalid {
                    line,
                    message: format!("component `{name}` has neither `cmd` nor `artifact`"),
                })
            }
            (Some(cmd), None) => {
                let span = cmd.span();
                if !self.args.is_empty() {
                    return Err(lines.invalid(&span, "`args` goes with `artifact`; put arguments in `cmd`".to_string()));
                }
                match cmd.into_inner() {
                    RawCmd::Line(l) if l.trim().is_empty() => {
                        return Err(lines.invalid(&span, format!("component `{name}`: `cmd` is empty")))
                    }
                    RawCmd::Line(l) => Run::Shell(l),
                    RawCmd::Argv(v) if v.first().is_none_or(|p| p.is_empty()) => {
                        return Err(lines.invalid(&span, format!("component `{name}`: `cmd` has no program")))
                    }
                    RawCmd::Argv(v) => Run::Argv(v),
                }
            }
            (None, Some(a)) => {
                let span = a.span();
                let digest = a.get_ref().parse::<Digest>().map_err(|e| lines.invalid(&span, e.to_string()))?;
                Run::Artifact { digest, args: self.args }
            }
        };
        let cpus = match self.cpus {
            Some(c) if !(c.get_ref().is_finite() && *c.get_ref() > 0.0) => {
                return Err(lines.invalid(&c.span(), format!("`cpus` must be a positive number, not {}", c.get_ref())))
            }
            c => c.map(Spanned::into_inner),
        };
        let mem = match self.mem {
            None => None,
            Some(m) => {
                let span = m.span();
                match m.into_inner() {
                    RawBytes::Count(0) => return Err(lines.invalid(&span, "`mem` must be positive".to_string())),
                    RawBytes::Count(n) => Some(n),
                    RawBytes::Text(t) => Some(parse_bytes(&t).map_err(|e| lines.invalid(&span, e.to_string()))?),
                }
            }
        };
        let mut after = Vec::with_capacity(self.after.len());
        let mut after_lines = Vec::with_capacity(self.after.len());
        for dep in self.after {
            let span = dep.span();
            after_lines.push(lines.line(span.start));
            let dep = ComponentName::from_str(dep.get_ref()).map_err(|m| lines.invalid(&span, m.to_string()))?;
            if dep == name {
                return Err(lines.invalid(&span, format!("component `{name}` lists itself in `after`")));
            }
            if after.contains(&dep) {
                return Err(lines.invalid(&span, format!("component `{name}` lists `{dep}` twice in `after`")));
            }
            after.push(dep);
        }
        let readiness = match self.ready {
            None => None,
            Some(r) => {
                let span = r.span();
                let r = r.into_inner();
                let check = match (r.tcp, r.cmd) {
                    (Some(p), None) => ReadyCheck::Tcp(p),
                    (None, Some(c)) if !c.trim().is_empty() => ReadyCheck::Command(c),
                    _ => {
                        return Err(lines.invalid(
                            &span,
                            "`ready` needs exactly one of `tcp = PORT` or `cmd = \"...\"`".to_string(),
                        ))
                    }
                };
                let timeout = match r.timeout {
                    None => DEFAULT_READY_TIMEOUT,
                    Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Duration::from_secs_f64(t),
                    Some(t) => {
                        return Err(lines.invalid(&span, format!("`ready.timeout` must be positive seconds, not {t}")))
                    }
                };
                Some(Readiness { check, timeout })
            }
        };
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') || key.starts_with("KECHO_") {
                return Err(AppError::Invalid {
                    line,
                    message: format!(
                        "component `{name}`: `{key}` cannot be set in `env` (empty, `=`, or reserved KECHO_)"
                    ),
                });
            }
        }
        Ok(ComponentSpec {
            name,
            run,
            reservation: ReservationSpec { require: self.require, rank: self.rank, cpus, mem },
            after,
            after_lines,
            port: self.port,
            readiness,
            on_failure: self.on_failure.unwrap_or(default_policy),
            env: self.env,
            line,
        })
    }
}

/// Byte offsets to 1-based lines and columns.
#[derive(Debug)]
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// The 1-based line and column of a byte offset.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        (line, offset - self.starts[line - 1] + 1)
    }

    pub(crate) fn line(&self, offset: usize) -> usize {
        self.position(offset).0
    }

    fn invalid(&self, span: &Range<usize>, message: String) -> AppError {
        AppError::Invalid { line: self.line(span.start), message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(text: &str, line: usize, needle: &str) {
        let err = AppSpec::parse(text, Some("app")).expect_err("must be refused");
        let shown = err.to_string();
        assert!(shown.contains(needle), "`{shown}` does not contain `{needle}`");
        let got = match err {
            AppError::Syntax { line, .. } | AppError::Invalid { line, .. } => line,
            AppError::Graph(g) => g.line(),
            other => panic!("unexpected error {other:?}"),
        };
        assert_eq!(got, line, "wrong line in `{shown}`");
    }

    const SHOP: &str = r#"
on_failure = "replace"

[component.db]
cmd = "exec sleep 100"
cpus = 2
mem = "512M"
port = 5432
ready = { tcp = 5432, timeout = 5 }

[component.api]
cmd = ["./api", "--db", "$KECHO_DEP_DB"]
after = ["db"]
require = "os == 'linux'"
port = 8000
ready = { cmd = "curl -sf localhost:8000/health" }
on_failure = "stop-dependents"
env = { RUST_LOG = "info" }

[component.web-front]
artifact = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
args = ["--port", "80"]
after = ["api", "db"]
mem = 1048576
"#;

    #[test]
    fn parses_every_field() {
        let app = AppSpec::parse(SHOP, Some("shop")).unwrap();
        assert_eq!(app.name.as_str(), "shop");
        let db = &app.components[&"db".parse().unwrap()];
        assert_eq!(db.run, Run::Shell("exec sleep 100".into()));
        assert_eq!(db.reservation.cpus, Some(2.0));
        assert_eq!(db.reservation.mem, Some(512 << 20));
        assert_eq!(db.on_failure, FailurePolicy::Replace, "the application's default applies");
        assert_eq!(db.readiness, Some(Readiness { check: ReadyCheck::Tcp(5432), timeout: Duration::from_secs(5) }));
        assert_eq!(db.line, 4);
        let api = &app.components[&"api".parse().unwrap()];
        assert_eq!(api.run, Run::Argv(vec!["./api".into(), "--db".into(), "$KECHO_DEP_DB".into()]));
        assert_eq!(api.on_failure, FailurePolicy::StopDependents);
        assert_eq!(api.reservation.require.as_deref(), Some("os == 'linux'"));
        assert_eq!(api.readiness.as_ref().unwrap().timeout, DEFAULT_READY_TIMEOUT);
        assert_eq!(api.env["RUST_LOG"], "info");
        let web = &app.components[&"web-front".parse().unwrap()];
        assert!(matches!(&web.run, Run::Artifact { args, .. } if args == &["--port", "80"]));
        assert_eq!(web.reservation.mem, Some(1 << 20));
        assert_eq!(web.after.len(), 2);
    }

    #[test]
    fn name_from_file_or_stem() {
        let app = AppSpec::parse("name = \"real\"\n[component.a]\ncmd = \"true\"\n", Some("stem")).unwrap();
        assert_eq!(app.name.as_str(), "real");
        let app = AppSpec::parse("[component.a]\ncmd = \"true\"\n", Some("stem")).unwrap();
        assert_eq!(app.name.as_str(), "stem");
        assert!(matches!(AppSpec::parse("[component.a]\ncmd = \"true\"\n", None), Err(AppError::NoName)));
    }

    #[test]
    fn load_takes_the_stem_of_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing.toml");
        std::fs::write(&path, "[component.a]\ncmd = \"true\"\n").unwrap();
        assert_eq!(AppSpec::load(&path).unwrap().name.as_str(), "billing");
        let missing = AppSpec::load(&dir.path().join("nope.toml")).unwrap_err();
        assert!(missing.to_string().contains("nope.toml"), "{missing}");
    }

    #[test]
    fn errors_name_the_line() {
        check_err("[component.a]\ncmd = \"true\"\nater = [\"b\"]\n", 3, "unknown field `ater`");
        check_err("[component.a]\ncmd = \"true\"\ncpus = \"two\"\n", 3, "");
        check_err("[component.a]\ncmd = \"true\"\n\n\ncpus = -1\n", 5, "positive");
        check_err("[component.a]\ncmd = \"true\"\nmem = \"12Q\"\n", 3, "unknown unit");
        check_err("[component.a]\ncmd = \"true\"\nartifact = \"sha256:00\"\n", 3, "both");
        check_err("[component.a]\nrequire = \"x\"\n", 1, "neither");
        check_err("\n[component.a]\ncmd = \"true\"\nartifact = \"md5:00\"\n", 4, "both");
        check_err("\n[component.a]\nartifact = \"md5:00\"\n", 3, "sha256");
        check_err("[component.a]\ncmd = \"true\"\nready = { tcp = 1, cmd = \"x\" }\n", 3, "exactly one");
        check_err("[component.a]\ncmd = \"true\"\nafter = [\"a\"]\n", 3, "itself");
        check_err("[component.a]\ncmd = \"true\"\n[component.B]\ncmd = \"true\"\n", 3, "not a component name");
        check_err("[component.a]\ncmd = \"true\"\n[component.a]\ncmd = \"x\"\n", 3, "");
        check_err(
            "[component.a]\ncmd = \"true\"\nafter = [\"b\"]\n\n[component.b]\ncmd = \"true\"\nafter = [\"a\"]\n",
            3,
            "a -> b -> a",
        );
        check_err("[component.a]\ncmd = \"true\"\nafter = [\"zz\"]\n", 3, "zz");
        check_err("[component.a]\ncmd = \"true\"\nenv = { KECHO_TASK = \"x\" }\n", 1, "reserved");
        check_err("[component.a]\ncmd = [ ]\n", 2, "no program");
        check_err("name = \"../x\"\n[component.a]\ncmd = \"true\"\n", 1, "not an application name");
        check_err("[component.a\ncmd = \"true\"\n", 1, "");
    }

    #[test]
    fn empty_application_is_refused() {
        assert!(matches!(AppSpec::parse("name = \"x\"\n", None), Err(AppError::Empty)));
    }

    #[test]
    fn variables_in_arguments() {
        let vars = vec![("KECHO_DEP_DB".to_string(), "10.0.0.2:5432".to_string())];
        assert_eq!(expand_vars("postgres://${KECHO_DEP_DB}/x", &vars), "postgres://10.0.0.2:5432/x");
        assert_eq!(expand_vars("${KECHO_DEP_DB}${KECHO_DEP_DB}", &vars), "10.0.0.2:5432".repeat(2));
        assert_eq!(expand_vars("${HOME} $5 ${unclosed", &vars), "${HOME} $5 ${unclosed");
        assert_eq!(expand_vars("", &vars), "");
    }

    #[test]
    fn the_example_application_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/apps/shop.toml");
        let app = AppSpec::load(&path).unwrap();
        assert_eq!(app.name.as_str(), "shop");
        let waves: Vec<Vec<&str>> =
            app.graph.waves().iter().map(|w| w.iter().map(ComponentName::as_str).collect()).collect();
        assert_eq!(waves, vec![vec!["db"], vec!["api"], vec!["web"]]);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_is_refused_or_parsed_never_a_panic(text in "(\\[component\\.[a-c]\\]\n|cmd = \"x\"\n|after = \\[\"[a-d]\"\\]\n|[ -~]{0,12}\n){0,12}") {
            if let Err(e) = AppSpec::parse(&text, Some("app")) {
                let line = match &e {
                    AppError::Syntax { line, .. } | AppError::Invalid { line, .. } => *line,
                    AppError::Graph(g) => g.line().max(1),
                    _ => 1,
                };
                // The end of the text counts as a line of its own after a final newline (where an unterminated
                // string or table is reported).
                let last = text.split('\n').count();
                proptest::prop_assert!(line >= 1 && line <= last, "line {} of {}: {}", line, last, e);
            }
        }
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("512").unwrap(), 512);
        assert_eq!(parse_bytes("4K").unwrap(), 4096);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_bytes("1 MB").unwrap(), 1 << 20);
        for bad in ["", "x", "0", "1X", "-1", "99999999999T"] {
            assert!(parse_bytes(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn dependency_environment() {
        let app = AppSpec::parse(SHOP, Some("shop")).unwrap();
        let web: ComponentName = "web-front".parse().unwrap();
        let env = app.dependency_env(&web, &|c| Some(format!("{}.node", c)));
        assert!(env.contains(&("KECHO_APP".into(), "shop".into())));
        assert!(env.contains(&("KECHO_COMPONENT".into(), "web-front".into())));
        assert!(env.contains(&("KECHO_DEP_API".into(), "api.node:8000".into())));
        assert!(env.contains(&("KECHO_DEP_DB".into(), "db.node:5432".into())));
        assert_eq!(web.env_key(), "WEB_FRONT");
    }
}
