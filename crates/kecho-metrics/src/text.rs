//! Reading the text format back: for tests, and for tools that scrape a node.

/// One sample: a metric name (with its `_total`, `_bucket`, ... suffix), its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The name as written.
    pub name: String,
    /// Labels in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// What is wrong with a line of text format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// A sample line that is not `name{labels} value`.
    #[error("line {line}: {why}")]
    Line {
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// Parses Prometheus or OpenMetrics text: every sample, comments skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).map_err(|why| ParseError::Line { line: i + 1, why })?);
    }
    Ok(out)
}

/// The value of the sample named `name` whose labels include all of `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v)))
        .map(|s| s.value)
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let key = rest[..eq].trim().to_owned();
            let r = rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?;
            let mut val = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, c)) => val.push(c),
                        None => return Err("unterminated label value".into()),
                    },
                    Some((j, '"')) => break j,
                    Some((_, c)) => val.push(c),
                    None => return Err("unterminated label value".into()),
                }
            };
            labels.push((key, val));
            rest = &r[end + 1..];
        }
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().map_err(|e| format!("bad value {v:?}: {e}"))?,
    };
    Ok(Sample { name: name.to_owned(), labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels() {
        let text = "# HELP a x\n# TYPE a counter\na_total 3\nb{channel=\"n\\\"e\",peer=\"1\"} 2.5\nc_bucket{le=\"+Inf\"} 7\n# EOF\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(value(&s, "a_total", &[]), Some(3.0));
        assert_eq!(value(&s, "b", &[("channel", "n\"e")]), Some(2.5));
        assert_eq!(value(&s, "b", &[("channel", "x")]), None);
        assert_eq!(value(&s, "c_bucket", &[("le", "+Inf")]), Some(7.0));
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(matches!(parse("a{b=c} 1"), Err(ParseError::Line { line: 1, .. })));
        assert!(parse("a 1\nb{x=\"1\"}").is_err());
        assert!(parse("a notanumber").is_err());
    }
}
