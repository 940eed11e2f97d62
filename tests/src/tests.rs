//! One module per family of endings; each test builds its own namespaces.

mod cli;
mod dashboard;
mod exposition;
mod faults;
mod graceful;
mod inventory;
mod labels;
mod lifecycle;
mod loss;
mod owners;
mod records;
mod resets;
mod scale;
mod soak;
mod timeouts;
mod various;
mod web;
// Last in the run (tests run in name order): its storm loads the whole host, and the
// shared daemon sees it; no scenario of the shared daemon runs after it.
mod workload;

use crate::{
    daemon::{Connection, daemon, wait_until},
    net::{Counters, Namespace, Pair},
    sock,
};

/// Port of the connection [`barrier`] opens.
const BARRIER_PORT: u16 = 9;

/// Returns once every event that happened in `pair` before the call has been judged:
/// verdicts come out in the order connections closed, so once a connection closed
/// *now* has its verdict, anything earlier would have had one too.
fn barrier(pair: &Pair) {
    let listener = pair.listen(BARRIER_PORT);
    let client = pair
        .client
        .enter(|| std::net::TcpStream::connect(Pair::server_addr(BARRIER_PORT)))
        .unwrap();
    let (server, _) = listener.accept().unwrap();
    sock::set_linger_zero(&client);
    drop(client);
    drop(server);
    drop(listener);
    let judged = wait_until(crate::daemon::VERDICT_TIMEOUT, || {
        daemon().connections(&pair.client).iter().any(|c| c.port == BARRIER_PORT)
    });
    assert!(judged, "barrier connection never judged");
}

/// Verdicts in `namespace` other than the barrier connections.
fn verdicts_besides_barrier(namespace: &Namespace) -> Vec<Connection> {
    daemon().connections(namespace).into_iter().filter(|c| c.port != BARRIER_PORT).collect()
}

/// Asserts a verdict (class, cause) and the role it was seen from.
#[track_caller]
fn assert_verdict(connection: &Connection, role: &str, class: &str, cause: &str) {
    assert_eq!(
        (connection.role.as_str(), connection.verdict()),
        (role, (class, cause)),
        "unexpected verdict: {connection:#?}"
    );
}

/// MIB counters of a namespace before a scenario, to compare with after it.
struct Mib<'a> {
    namespace: &'a Namespace,
    before: Counters,
}

impl<'a> Mib<'a> {
    fn snapshot(namespace: &'a Namespace) -> Self {
        Self { namespace, before: namespace.counters() }
    }

    /// Asserts how much each counter grew since the snapshot.
    #[track_caller]
    fn assert_deltas(&self, expected: &[(&str, i64)]) {
        let after = self.namespace.counters();
        let actual: Vec<(&str, i64)> =
            expected.iter().map(|(name, _)| (*name, self.before.delta(&after, name))).collect();
        assert_eq!(actual, expected, "nstat deltas in {}", self.namespace.name());
    }
}
