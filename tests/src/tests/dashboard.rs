//! The Grafana dashboard (deploy/grafana/observer.json) against a real Prometheus that
//! scrapes the daemon while connections end in every class: each template variable must
//! resolve and every panel's query must parse and return data, as Grafana would run it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::assert_verdict;
use crate::{
    daemon::daemon,
    net::Pair,
    prometheus::{JOB, Prometheus, SCRAPE_INTERVAL},
    sock,
};

const DASHBOARD: &str = include_str!("../../../deploy/grafana/observer.json");

/// What Grafana puts for `$__rate_interval` with a 1 s scrape interval and a 1 s step:
/// max(4 × scrape interval, step + scrape interval).
const RATE_INTERVAL: &str = "4s";

/// One query of one panel, as the dashboard has it.
struct PanelQuery {
    panel: String,
    ref_id: String,
    expression: String,
    instant: bool,
}

fn panel_queries(dashboard: &Value) -> Vec<PanelQuery> {
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = Vec::new();
    for panel in panels.iter().filter(|panel| panel["type"] != "row") {
        let title = panel["title"].as_str().expect("panel title").to_string();
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title:?} must use the dashboard's Prometheus input"
        );
        let targets = panel["targets"].as_array().filter(|targets| !targets.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {title:?} has no query"));
        for target in targets {
            queries.push(PanelQuery {
                panel: title.clone(),
                ref_id: target["refId"].as_str().unwrap_or("?").to_string(),
                expression: target["expr"].as_str().expect("expr").to_string(),
                instant: target["instant"] == true,
            });
        }
    }
    queries
}

/// Replaces `$name` and `${name}` by their values (longest names first).
fn substitute(expression: &str, variables: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = variables.iter().collect();
    sorted.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut result = expression.to_string();
    for (name, value) in sorted {
        result = result.replace(&format!("${{{name}}}"), value).replace(&format!("${name}"), value);
    }
    result
}

/// Resolves a `label_values(selector, label)` variable query through the label API.
fn label_values(prometheus: &Prometheus, query: &str, start: &str, end: &str) -> Vec<String> {
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("variable query {query:?} is not label_values(selector, label)"));
    let (selector, label) = inner.rsplit_once(',').expect("label_values(selector, label)");
    let data = prometheus
        .api(
            &format!("/api/v1/label/{}/values", label.trim()),
            &[("match[]", selector.trim()), ("start", start), ("end", end)],
        )
        .unwrap_or_else(|error| panic!("variable query {query:?}: {error}"));
    data.as_array()
        .expect("label values")
        .iter()
        .filter_map(|value| value.as_str().map(str::to_string))
        .collect()
}

/// Whether a query result has at least one finite sample (a panel would draw something).
fn has_data(data: &Value) -> bool {
    let finite = |sample: &Value| {
        sample[1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite)
    };
    data["result"].as_array().is_some_and(|series| {
        series.iter().any(|one| {
            one["values"].as_array().is_some_and(|samples| samples.iter().any(finite))
                || (one["value"].is_array() && finite(&one["value"]))
        })
    })
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// On `pair`: a graceful close, a reset, and a passive close whose socket waits in
/// CLOSE_WAIT until Prometheus has seen it there.
fn graceful_reset_and_close_wait(pair: &Pair, prometheus: &Prometheus, round: usize) {
    let (client, server) = pair.connect(7612);
    drop(client);
    drop(server);
    let (client, server) = pair.connect(7613);
    sock::set_linger_zero(&client);
    drop(client);
    let (client, server_closing_first) = pair.connect(7614);
    drop(server_closing_first);
    prometheus.wait_for_scrapes(2);
    drop(client);
    let verdicts = daemon().verdicts(&pair.client, 3 * round);
    let this_round: Vec<(u16, (&str, &str))> =
        verdicts[3 * (round - 1)..].iter().map(|c| (c.port, c.verdict())).collect();
    assert_eq!(
        this_round,
        [(7612, ("fin", "active")), (7613, ("rst", "linger_zero")), (7614, ("fin", "passive"))]
    );
    drop(server);
    daemon().verdicts(&pair.server, 3 * round);
}

/// A keepalive timeout: the cable of a fresh pair is cut under an idle connection.
fn keepalive_timeout() {
    let pair = Pair::new();
    let (client, server) = pair.connect(7611);
    sock::set_fast_keepalive(&client);
    pair.cut_cable();
    let verdict = daemon().verdicts_within(&pair.client, 1, Duration::from_secs(30)).remove(0);
    assert_verdict(&verdict, "client", "timeout", "keepalive");
    drop((client, server));
}

#[test]
fn every_dashboard_panel_returns_data() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let queries = panel_queries(&dashboard);

    let target = daemon().base_url.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&target);
    let start = unix_now();

    // Scenario traffic between namespaces, each ending twice: the first creates its
    // series, the second makes rate() see it grow (as on a live host).
    let pair = Pair::new();
    for round in 1..=2 {
        graceful_reset_and_close_wait(&pair, &prometheus, round);
        keepalive_timeout();
        prometheus.wait_for_scrapes(2);
    }

    // Enough scrapes after the last verdict for rate() over $__rate_interval to see it.
    prometheus.wait_for_scrapes(6);
    let end = unix_now();
    let (start_text, end_text) = (format!("{start:.3}"), format!("{end:.3}"));

    // Template variables, resolved as Grafana would, each from the previous ones.
    let mut variables: Vec<(String, String)> = vec![
        ("__rate_interval".into(), RATE_INTERVAL.into()),
        ("__range".into(), format!("{}s", (end - start).ceil() as u64 + 1)),
    ];
    for variable in dashboard["templating"]["list"].as_array().expect("templating") {
        let name = variable["name"].as_str().expect("variable name");
        let query = substitute(variable["query"]["query"].as_str().expect("query"), &variables);
        let values = label_values(&prometheus, &query, &start_text, &end_text);
        let wanted = match name {
            "job" => JOB.to_string(),
            "instance" => target.clone(),
            other => panic!("unexpected dashboard variable {other}"),
        };
        assert!(values.contains(&wanted), "variable {name} ({query}) offers {values:?}");
        variables.push((name.to_string(), wanted));
    }

    let step = format!("{}", SCRAPE_INTERVAL.as_secs());
    let mut failures = Vec::new();
    for query in &queries {
        let expression = substitute(&query.expression, &variables);
        assert!(!expression.contains('$'), "unresolved variable in {expression}");
        let result = if query.instant {
            prometheus.api("/api/v1/query", &[("query", &expression), ("time", &end_text)])
        } else {
            prometheus.api(
                "/api/v1/query_range",
                &[
                    ("query", &expression),
                    ("start", &start_text),
                    ("end", &end_text),
                    ("step", &step),
                ],
            )
        };
        let name = format!("{:?} {}: {expression}", query.panel, query.ref_id);
        match result {
            Err(error) => failures.push(format!("{name}\n    error: {error}")),
            Ok(data) if has_data(&data) => {}
            Ok(_) => failures.push(format!("{name}\n    no data")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
}
