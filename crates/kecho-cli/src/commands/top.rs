//! `kecho top`: a live terminal view of a cluster: the registry's channels, their members, event rates, drops and
//! links, refreshed every second. Rates, drops and links come from nodes started with `--report`.

use std::time::Duration;

use anyhow::{bail, Result};
use kecho_metrics::cluster::View;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Row, Table};
use ratatui::Frame;

use crate::node_args::RegistryArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    reg: RegistryArg,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
}

pub async fn run(a: Args) -> Result<()> {
    if !(a.interval > 0.0 && a.interval.is_finite()) {
        bail!("--interval must be a positive number of seconds");
    }
    let reg = a.reg.addrs()?;
    let mut views = kecho_metrics::cluster::watch(reg, Duration::from_secs_f64(a.interval)).await?;
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
    let title = format!("kecho top: registry {}", a.reg.registry);
    let result = async {
        loop {
            let view = views.borrow_and_update().clone();
            terminal.draw(|f| draw(f, &title, &view))?;
            tokio::select! {
                changed = views.changed() => if changed.is_err() { bail!("the cluster watcher stopped") },
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

/// Draws one screen of `view`.
pub fn draw(f: &mut Frame, title: &str, view: &View) {
    let members: usize = view.channels.iter().map(|c| c.members.len()).sum();
    let [head, chans, mems, nodes] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(view.channels.len() as u16 + 3),
        Constraint::Min(members as u16 + 3),
        Constraint::Min(view.nodes.len() as u16 + 3),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use kecho_metrics::cluster::{ChannelView, MemberView, NodeView};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(view: &View) -> String {
        let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
        t.draw(|f| draw(f, "kecho top: registry 127.0.0.1:7400", view)).unwrap();
        let buf = t.backend().buffer();
        (0..buf.area.height)
            .map(|y| (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
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
