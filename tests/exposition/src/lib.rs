//! The Prometheus text exposition format (0.0.4) read back into samples: what
//! `cargo xtask bench` and the integration tests see of the daemon's `/metrics`.
//!
//! A sample line is `name{label="value",…} value [timestamp]`; label values escape `\`,
//! `"` and newlines as `\\`, `\"` and `\n`, and may hold commas, `=` and `}`. `# HELP`
//! and `# TYPE` comments, blank lines and lines that are not samples are skipped. Each
//! histogram or summary line is a sample of its own (`_bucket`, `_sum`, `_count`).

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `name{labels}` exactly as printed (label values still escaped).
    pub series: String,
    pub name: String,
    /// In printed order, values unescaped.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// Reads one line; None for comments, blank lines and anything that is not a sample.
    pub fn parse(line: &str) -> Option<Self> {
        let line = skip_blanks(line);
        let name = &line[..identifier_len(line, true)];
        if name.is_empty() {
            return None;
        }
        let (labels, rest) = match skip_blanks(&line[name.len()..]).strip_prefix('{') {
            Some(inner) => parse_labels(inner)?,
            None => (Vec::new(), &line[name.len()..]),
        };
        let series = &line[..line.len() - rest.len()];
        if !rest.starts_with([' ', '\t']) {
            return None;
        }
        let mut fields = rest.split([' ', '\t']).filter(|field| !field.is_empty());
        let value = fields.next()?.parse().ok()?;
        if let Some(timestamp) = fields.next() {
            timestamp.parse::<i64>().ok()?;
        }
        if fields.next().is_some() {
            return None;
        }
        Some(Self { series: series.to_string(), name: name.to_string(), labels, value })
    }

    /// The (unescaped) value of label `name`.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(label, _)| label == name).map(|(_, value)| value.as_str())
    }

    /// Whether the sample is of metric `name` with every `label="value"` given.
    pub fn matches(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name && labels.iter().all(|&(label, value)| self.label(label) == Some(value))
    }
}

/// The samples of an exposition, in printed order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition(pub Vec<Sample>);

impl Exposition {
    pub fn parse(text: &str) -> Self {
        Self(text.lines().filter_map(Sample::parse).collect())
    }

    /// Sum of the samples of `name` whose labels include every `label="value"` given.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0.iter().filter(|sample| sample.matches(name, labels)).map(|sample| sample.value).sum()
    }
}

fn skip_blanks(text: &str) -> &str {
    text.trim_start_matches([' ', '\t'])
}

/// Length of the metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or label name (the same
/// without `:`) that `text` starts with; 0 if none.
fn identifier_len(text: &str, colons: bool) -> usize {
    let allowed = |(i, c): &(usize, char)| {
        c.is_ascii_alphabetic()
            || *c == '_'
            || (colons && *c == ':')
            || (*i > 0 && c.is_ascii_digit())
    };
    text.char_indices().take_while(allowed).map(|(_, c)| c.len_utf8()).sum()
}

/// Reads `label="value",…}` (the text after `{`); returns the labels and the text after
/// the `}`.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = skip_blanks(text);
        if let Some(rest) = text.strip_prefix('}') {
            return Some((labels, rest));
        }
        let name = &text[..identifier_len(text, false)];
        if name.is_empty() {
            return None;
        }
        text =
            skip_blanks(skip_blanks(&text[name.len()..]).strip_prefix('=')?).strip_prefix('"')?;
        let (value, rest) = parse_quoted(text)?;
        labels.push((name.to_string(), value));
        text = skip_blanks(rest);
        if let Some(rest) = text.strip_prefix(',') {
            text = rest;
        } else if !text.starts_with('}') {
            return None;
        }
    }
}

/// Reads an escaped label value up to its closing quote (the text after the opening
/// one); returns it unescaped and the text after the closing quote.
fn parse_quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    loop {
        let (i, c) = chars.next()?;
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                escaped @ ('\\' | '"') => value.push(escaped),
                // Not an escape the format defines: kept as printed.
                other => {
                    value.push('\\');
                    value.push(other);
                }
            },
            c => value.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(sample: &Sample) -> Vec<(&str, &str)> {
        sample.labels.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect()
    }

    #[test]
    fn reads_samples_and_skips_comments_and_blank_lines() {
        let exposition = Exposition::parse(
            "# HELP observer_events_total Events read.\n\
             # TYPE observer_events_total counter\n\
             observer_events_total 12\n\
             \n\
             observer_tcp_closes_total{class=\"fin\",cause=\"active\",port=\"4000\"} 5\n\
             observer_tcp_connection_duration_seconds_bucket{le=\"+Inf\"} 3\n\
             observer_build_info{version=\"0.1.0\"} 1 1700000000000\n\
             process_start_time_seconds 1.7e9\n\
             observer_tracker_fill NaN\n",
        );
        let series: Vec<&str> = exposition.0.iter().map(|s| s.series.as_str()).collect();
        assert_eq!(
            series,
            [
                "observer_events_total",
                "observer_tcp_closes_total{class=\"fin\",cause=\"active\",port=\"4000\"}",
                "observer_tcp_connection_duration_seconds_bucket{le=\"+Inf\"}",
                "observer_build_info{version=\"0.1.0\"}",
                "process_start_time_seconds",
                "observer_tracker_fill",
            ]
        );
        let closes = &exposition.0[1];
        assert_eq!(closes.name, "observer_tcp_closes_total");
        assert_eq!(labels(closes), [("class", "fin"), ("cause", "active"), ("port", "4000")]);
        assert_eq!(closes.value, 5.0);
        assert_eq!(exposition.0[0].labels, []);
        assert_eq!(exposition.0[2].label("le"), Some("+Inf"));
        assert_eq!(exposition.0[3].value, 1.0, "the timestamp is not the value");
        assert_eq!(exposition.0[4].value, 1.7e9);
        assert!(exposition.0[5].value.is_nan());
    }

    #[test]
    fn label_values_may_hold_commas_quotes_braces_and_escapes() {
        let line =
            r#"observer_tcp_closes_total{comm="a,b=c}",path="C:\\dir \"x\"\nend",role="client"} 2"#;
        let sample = Sample::parse(line).unwrap();
        assert_eq!(sample.name, "observer_tcp_closes_total");
        assert_eq!(
            labels(&sample),
            [("comm", "a,b=c}"), ("path", "C:\\dir \"x\"\nend"), ("role", "client")]
        );
        assert_eq!(sample.value, 2.0);
        assert_eq!(sample.series, line.rsplit_once(' ').unwrap().0, "the series as printed");
        assert!(sample.matches("observer_tcp_closes_total", &[("comm", "a,b=c}")]));
        assert!(!sample.matches("observer_tcp_closes_total", &[("comm", "a")]));
    }

    #[test]
    fn tolerates_blanks_a_trailing_comma_and_empty_braces() {
        let sample = Sample::parse("  m { a = \"1\" , b=\"2\", }\t 3 ").unwrap();
        assert_eq!(sample.series, "m { a = \"1\" , b=\"2\", }");
        assert_eq!(labels(&sample), [("a", "1"), ("b", "2")]);
        assert_eq!(sample.value, 3.0);
        let sample = Sample::parse("m{} 4").unwrap();
        assert_eq!((sample.series.as_str(), sample.value), ("m{}", 4.0));
        assert_eq!(sample.labels, []);
    }

    #[test]
    fn rejects_what_is_not_a_sample() {
        for line in [
            "",
            "# TYPE m counter",
            "m",
            "m{a=\"1\"}",
            "m 1 2 3",
            "m one",
            "m{a=\"1\"} 1 soon",
            "m{a=\"1} 1",
            "m{a=1} 1",
            "m{a=\"1\" b=\"2\"} 1",
            "m{=\"1\"} 1",
            "m{a=\"1\"}1",
            "1m 1",
            "{a=\"1\"} 1",
        ] {
            assert_eq!(Sample::parse(line), None, "{line:?}");
        }
    }

    #[test]
    fn sums_a_metric_over_the_samples_with_the_labels_given() {
        let exposition = Exposition::parse(
            "observer_tcp_closes_total{class=\"fin\",role=\"client\",port=\"4000\"} 5\n\
             observer_tcp_closes_total{class=\"rst\",role=\"client\",port=\"4001\"} 2\n\
             observer_tcp_closes_total{class=\"fin\",role=\"server\",port=\"4000\"} 7\n\
             observer_tcp_closes_total_other{class=\"fin\"} 100\n\
             observer_tcp_close_wait_age_seconds_count{port=\"4000\"} 3\n",
        );
        assert_eq!(exposition.sum("observer_tcp_closes_total", &[]), 14.0);
        assert_eq!(exposition.sum("observer_tcp_closes_total", &[("class", "fin")]), 12.0);
        assert_eq!(
            exposition.sum("observer_tcp_closes_total", &[("port", "4000"), ("role", "client")]),
            5.0
        );
        assert_eq!(exposition.sum("observer_tcp_closes_total", &[("port", "400")]), 0.0);
        assert_eq!(exposition.sum("observer_tcp_close_wait_age_seconds_count", &[]), 3.0);
        assert_eq!(exposition.sum("missing", &[]), 0.0);
    }
}
