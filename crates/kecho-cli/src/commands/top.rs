//! `kecho top`: a live terminal view of a cluster: the registry's channels, their members, event rates, drops and
//! links, and the resource agents with their load, refreshed every second. Rates, drops and links come from nodes
//! started with `--report`; agents from their reports on `kecho.resources` (as on `kecho ui`'s page).

use std::time::Duration;

use anyhow::{bail, Result};
use kecho::Value;
use kecho_metrics::cluster::View;
use kecho_resources::types::human;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Row, Table};
use ratatui::Frame;

use crate::commands::live::{Agents, LiveArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    live: LiveArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let live = a.live.start().await?;
    let mut views = live.views;
    let mut agents = live.agents;
    // Keys are read on a thread of their own (crossterm's reads block); it ends with the process.
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || loop {
        match event::poll(Duration::from_millis(200)) {
            Ok(true) => match event::read() {
                Ok(ev) => {
                    if keys_tx.send(ev).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            Ok(false) => {
                if keys_tx.is_closed() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
    let mut terminal = ratatui::try_init()?;
    let title = format!("kecho top: registry {}", a.live.reg.registry);
    let result = async {
        loop {
            let view = views.borrow_and_update().clone();
            let shown = agents.as_mut().map(|a| a.borrow_and_update().clone());
            terminal.draw(|f| draw(f, &title, &view, shown.as_ref()))?;
            tokio::select! {
                changed = views.changed() => if changed.is_err() { bail!("the cluster watcher stopped") },
                changed = async {
                    match agents.as_mut() {
                        Some(a) => a.changed().await,
                        None => std::future::pending().await,
                    }
                } => if changed.is_err() { bail!("the agents' view stopped") },
                key = keys.recv() => match key {
                    Some(ev) if quits(&ev) => return Ok(()),
                    Some(_) => {}
                    None => bail!("cannot read the terminal"),
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
    .await;
    ratatui::restore();
    result
}

/// `q`, Esc or Ctrl-C (in raw mode Ctrl-C is a key, not a signal).
fn quits(ev: &Event) -> bool {
    let Event::Key(k) = ev else { return false };
    k.kind == KeyEventKind::Press
        && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
            || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL)))
}

fn rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k", r / 1000.0)
    } else {
        format!("{r:.1}")
    }
}

fn opt(n: Option<u32>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// Draws one screen of `view` and, unless agents are not followed (`--no-agents`), the agents.
pub fn draw(f: &mut Frame, title: &str, view: &View, agents: Option<&Agents>) {
    let members: usize = view.channels.iter().map(|c| c.members.len()).sum();
    let agent_rows = agents.map_or(0, |a| a.list.len().max(1) + 3) as u16;
    let [head, chans, mems, nodes, agents_area] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(view.channels.len() as u16 + 3),
        Constraint::Min(members as u16 + 3),
        Constraint::Min(view.nodes.len() as u16 + 3),
        Constraint::Min(agent_rows),
    ])
    .areas(f.area());
    let status = match &view.registry_error {
        Some(e) => format!("registry unreachable: {e}"),
        None => format!("{} channel(s), {} reporting node(s)", view.channels.len(), view.nodes.len()),
    };
    f.render_widget(
        ratatui::widgets::Paragraph::new(vec![
            Line::styled(title.to_owned(), Style::new().add_modifier(Modifier::BOLD)),
            Line::from(format!("{status}    q quits")),
        ]),
        head,
    );
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let rows = view.channels.iter().map(|c| {
        Row::new(vec![
            c.name.clone(),
            opt(c.sources),
            opt(c.sinks),
            rate(c.submitted_per_s),
            rate(c.received_per_s),
            c.dropped.to_string(),
            c.lagged.to_string(),
            c.contact.clone().unwrap_or_else(|| "(not listed)".into()),
        ])
    });
    let t = Table::new(
        rows,
        [
            Constraint::Fill(2),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Fill(1),
        ],
    )
    .header(Row::new(["CHANNEL", "SOURCES", "SINKS", "SUBMIT/S", "RECV/S", "DROPPED", "LAGGED", "CONTACT"]).style(bold))
    .block(Block::bordered().title(" channels "));
    f.render_widget(t, chans);
    let rows = view.channels.iter().flat_map(|c| {
        c.members.iter().map(|m| {
            Row::new(vec![
                c.name.clone(),
                m.node.clone(),
                rate(m.submitted_per_s),
                rate(m.received_per_s),
                rate(m.sent_bytes_per_s),
                m.dropped.to_string(),
                m.lagged.to_string(),
            ])
        })
    });
    let t = Table::new(
        rows,
        [
            Constraint::Fill(2),
            Constraint::Fill(2),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(["CHANNEL", "MEMBER NODE", "SUBMIT/S", "RECV/S", "BYTES/S", "DROPPED", "LAGGED"]).style(bold))
    .block(Block::bordered().title(" members (nodes started with --report) "));
    f.render_widget(t, mems);
    let rows = view.nodes.iter().map(|n| {
        Row::new(vec![n.node.clone(), n.links.to_string(), n.reconnects.to_string(), n.queued_bytes.to_string()])
    });
    let t =
        Table::new(rows, [Constraint::Fill(2), Constraint::Length(8), Constraint::Length(12), Constraint::Length(14)])
            .header(Row::new(["NODE", "LINKS", "RECONNECTS", "QUEUED BYTES"]).style(bold))
            .block(Block::bordered().title(" links "));
    f.render_widget(t, nodes);
    if let Some(a) = agents {
        draw_agents(f, agents_area, a);
    }
}

/// The agents as `kecho ui` shows them: free / capacity, reserved, the host's load and CPU use, the other
/// attributes, the report's age.
fn draw_agents(f: &mut Frame, area: ratatui::layout::Rect, a: &Agents) {
    let now = a.at.unwrap_or_else(std::time::Instant::now);
    let rows = a.list.iter().map(|e| {
        let r = &e.report;
        let (cap, free, reserved) = (r.capacity(), r.free(), r.reserved());
        let amounts = |of: Option<&kecho_resources::Amounts>, total: &kecho_resources::Amounts| {
            total
                .iter()
                .map(|(k, v)| match of {
                    Some(o) => format!("{k} {} / {}", human(k, o.amount(k)), human(k, v)),
                    None => format!("{k} {}", human(k, v)),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let num = |k: &str| match r.attrs.get(k) {
            Some(Value::Float(x)) => Some(*x),
            Some(Value::Int(i)) => Some(*i as f64),
            _ => None,
        };
        let derived = |k: &str| {
            cap.iter().any(|(c, _)| k == c || k == format!("{c}_free") || k == format!("{c}_reserved"))
                || matches!(k, "agent" | "epoch" | "seq" | "lifetime_ms" | "lv" | "resources" | "unknown")
                || matches!(k, "host_load1" | "host_cpu_use")
        };
        let others: Vec<String> = r
            .attrs
            .iter()
            .filter(|(k, _)| !derived(k))
            .map(|(k, v)| match v {
                Value::Float(x) => format!("{k}={x:.2}"),
                Value::Str(s) => format!("{k}={s}"),
                other => format!("{k}={}", crate::attrs::value_text(other)),
            })
            .collect();
        Row::new(vec![
            r.agent.clone(),
            amounts(Some(&free), &cap),
            amounts(None, &reserved),
            num("host_load1").map_or_else(|| "-".to_owned(), |l| format!("{l:.2}")),
            num("host_cpu_use").map_or_else(|| "-".to_owned(), |u| format!("{:.0} %", u * 100.0)),
            others.join(" "),
            format!("{:.1} s", e.age(now).as_secs_f64()),
        ])
    });
    let title = match &a.error {
        Some(e) => format!(" agents: {e} "),
        None if a.list.is_empty() => " agents: none reporting (kecho agent) ".to_owned(),
        None => format!(" agents ({}) ", a.list.len()),
    };
    let t = Table::new(
        rows,
        [
            Constraint::Length(14),
            Constraint::Fill(3),
            Constraint::Fill(2),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Fill(2),
            Constraint::Length(7),
        ],
    )
    .header(
        Row::new(["AGENT", "FREE / CAPACITY", "RESERVED", "LOAD 1M", "CPU USE", "ATTRIBUTES", "AGE"])
            .style(Style::new().add_modifier(Modifier::BOLD)),
    )
    .block(Block::bordered().title(title));
    f.render_widget(t, area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kecho_metrics::cluster::{ChannelView, MemberView, NodeView};
    use kecho_resources::view::ViewEntry;
    use kecho_resources::Report;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen_with(view: &View, agents: Option<&Agents>) -> String {
        let mut t = Terminal::new(TestBackend::new(140, 36)).unwrap();
        t.draw(|f| draw(f, "kecho top: registry 127.0.0.1:7400", view, agents)).unwrap();
        let buf = t.backend().buffer();
        (0..buf.area.height)
            .map(|y| (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn screen(view: &View) -> String {
        screen_with(view, None)
    }

    fn check(view: &View, want: &[&str]) {
        let s = screen(view);
        for w in want {
            assert!(s.contains(w), "{w:?} not on screen:\n{s}");
        }
    }

    #[test]
    fn channels_members_rates_drops_and_links_are_shown() {
        let view = View {
            registry_error: None,
            channels: vec![ChannelView {
                name: "news".into(),
                listed: true,
                sources: Some(1),
                sinks: Some(2),
                contact: Some("127.0.0.1:4100".into()),
                submitted_per_s: 250.0,
                received_per_s: 500.0,
                dropped: 7,
                lagged: 3,
                members: vec![MemberView {
                    node: "127.0.0.1:4200".into(),
                    sources: 1,
                    sinks: 2,
                    submitted_per_s: 250.0,
                    received_per_s: 0.0,
                    sent_bytes_per_s: 12_500.0,
                    dropped: 7,
                    lagged: 3,
                }],
            }],
            nodes: vec![NodeView { node: "127.0.0.1:4200".into(), links: 2, reconnects: 1, queued_bytes: 64 }],
        };
        check(&view, &["1 channel(s), 1 reporting node(s)", "news", "250.0", "500.0", "127.0.0.1:4100", "12.5k"]);
        let s = screen(&view);
        let row = s.lines().find(|l| l.contains("news") && l.contains("127.0.0.1:4100")).unwrap();
        assert!(row.contains(" 7 ") && row.contains(" 3 "), "{row}");
        let link = s.lines().find(|l| l.contains("127.0.0.1:4200") && !l.contains("news")).unwrap();
        assert_eq!(link.replace('│', " ").split_whitespace().collect::<Vec<_>>(), ["127.0.0.1:4200", "2", "1", "64"]);
    }

    /// An agent's report as it arrives on `kecho.resources`.
    fn agent(name: &str, cpus_free: i64, measured: bool, age: Duration, now: std::time::Instant) -> ViewEntry {
        let mut a = kecho::Attrs::new()
            .with("agent", name)
            .with("epoch", 7i64)
            .with("seq", 3i64)
            .with("lifetime_ms", 3000i64)
            .with("resources", "cpus,mem")
            .with("cpus", 16i64)
            .with("cpus_free", cpus_free)
            .with("cpus_reserved", 16 - cpus_free)
            .with("mem", 8_000_000_000i64)
            .with("mem_free", 6_000_000_000i64)
            .with("mem_reserved", 2_000_000_000i64)
            .with("zone", "b");
        if measured {
            a.set("host_load1", 3.25);
            a.set("host_cpu_use", 0.42);
        }
        ViewEntry { report: Report::from_attrs(&a).unwrap(), received: now - age }
    }

    #[test]
    fn agents_are_shown_with_their_load_as_on_the_page() {
        let now = std::time::Instant::now();
        let agents = Agents {
            list: vec![
                agent("gpu-1", 12, true, Duration::from_millis(400), now),
                agent("lender", 16, false, Duration::from_millis(1500), now),
            ],
            at: Some(now),
            error: None,
        };
        let s = screen_with(&View::default(), Some(&agents));
        assert!(s.contains(" agents (2) "), "{s}");
        let row = |name: &str| s.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("no {name} row:\n{s}"));
        let busy = row("gpu-1");
        for want in ["cpus 12 / 16", "mem 6.0 GB / 8.0 GB", "cpus 4", "3.25", "42 %", "zone=b", "0.4 s"] {
            assert!(busy.contains(want), "{want:?} not in {busy:?}");
        }
        // The load and CPU use are columns of their own, not repeated among the other attributes.
        assert!(!busy.contains("host_load1"), "{busy}");
        let idle = row("lender");
        assert!(idle.contains("cpus 16 / 16") && idle.contains("1.5 s"), "{idle}");
        assert_eq!(idle.replace('│', " ").split_whitespace().filter(|w| *w == "-").count(), 2, "{idle}");
    }

    #[test]
    fn no_agents_and_an_agents_error_are_said() {
        let none = Agents { list: vec![], at: Some(std::time::Instant::now()), error: None };
        assert!(screen_with(&View::default(), Some(&none)).contains("agents: none reporting"));
        let err = Agents { error: Some("cannot follow kecho.resources: refused".into()), ..Agents::default() };
        assert!(screen_with(&View::default(), Some(&err)).contains("agents: cannot follow kecho.resources: refused"));
        // --no-agents: no agents panel at all.
        assert!(!screen(&View::default()).contains("AGENT"));
    }

    #[test]
    fn an_unreachable_registry_is_said() {
        let view = View { registry_error: Some("connection refused".into()), ..View::default() };
        check(&view, &["registry unreachable: connection refused", "q quits", "CHANNEL"]);
    }

    #[test]
    fn q_esc_and_ctrl_c_quit_other_keys_do_not() {
        use ratatui::crossterm::event::KeyEvent;
        let key = |c, m| Event::Key(KeyEvent::new(c, m));
        assert!(quits(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(&key(KeyCode::Down, KeyModifiers::NONE)));
    }
}
