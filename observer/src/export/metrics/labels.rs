//! Label values that cannot be squatted: every label whose values come from the host
//! (ports, namespaces, process names) has a cap, values past it are exported as
//! "other", and each value refused is counted (`observer_label_values_refused_total`),
//! so a full cap shows and can be alerted on.

use std::{collections::HashSet, hash::Hash};

use prometheus::IntCounter;

/// The label value of everything past a cap.
pub const OTHER: &str = "other";

/// Ports below this are privileged (`net.ipv4.ip_unprivileged_port_start`'s default):
/// only root or CAP_NET_BIND_SERVICE listens there, so they always get their own value.
const FIRST_UNPRIVILEGED_PORT: u16 = 1024;

/// The first `max` distinct values get their own label value; later ones are "other".
pub struct CappedLabel<T> {
    max: usize,
    seen: HashSet<T>,
    refused: IntCounter,
}

impl<T: Hash + Eq + Clone + ToString> CappedLabel<T> {
    pub fn new(max: usize, refused: IntCounter) -> Self {
        Self { max, seen: HashSet::new(), refused }
    }

    /// Whether `value` gets a label value of its own.
    pub fn admit(&mut self, value: &T) -> bool {
        let admitted = self.seen.contains(value)
            || (self.seen.len() < self.max && self.seen.insert(value.clone()));
        if !admitted {
            self.refused.inc();
        }
        admitted
    }

    pub fn label(&mut self, value: &T) -> String {
        if self.admit(value) { value.to_string() } else { OTHER.to_string() }
    }
}

/// The `port` label's values, so that an unprivileged local user cannot take them all
/// before a real service shows up: privileged ports always have their own value; ports
/// something listens on may take the whole cap; any other port (a client's remote port,
/// the CLOSE_WAIT sockets of a listener that is gone) at most half of it.
pub struct PortLabels {
    max: usize,
    /// Ports listening at the latest inventory.
    listening: HashSet<u16>,
    admitted: HashSet<u16>,
    /// How many of `admitted` were not listening when admitted.
    unlisted: usize,
    refused: IntCounter,
}

impl PortLabels {
    pub fn new(max: usize, refused: IntCounter) -> Self {
        Self { max, listening: HashSet::new(), admitted: HashSet::new(), unlisted: 0, refused }
    }

    /// The ports something listens on now, from an inventory.
    pub fn set_listening(&mut self, ports: impl IntoIterator<Item = u16>) {
        self.listening = ports.into_iter().collect();
    }

    /// A socket started listening on `port` (a transition to LISTEN): known at once,
    /// before the next inventory lists it.
    pub fn learn_listening(&mut self, port: u16) {
        self.listening.insert(port);
    }

    /// Whether `port` gets a label value of its own.
    pub fn admit(&mut self, port: u16) -> bool {
        if port < FIRST_UNPRIVILEGED_PORT || self.admitted.contains(&port) {
            return true;
        }
        let listening = self.listening.contains(&port);
        if self.admitted.len() < self.max && (listening || self.unlisted < self.max / 2) {
            self.admitted.insert(port);
            self.unlisted += usize::from(!listening);
            return true;
        }
        self.refused.inc();
        false
    }

    pub fn label(&mut self, port: u16) -> String {
        if self.admit(port) { port.to_string() } else { OTHER.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> IntCounter {
        IntCounter::new("refused", "refused").unwrap()
    }

    #[test]
    fn values_past_the_cap_are_other_and_counted() {
        let refused = counter();
        let mut names = CappedLabel::new(2, refused.clone());
        assert_eq!(names.label(&"nginx".to_string()), "nginx");
        assert_eq!(names.label(&"curl".to_string()), "curl");
        assert_eq!(names.label(&"evil".to_string()), OTHER);
        assert_eq!(names.label(&"nginx".to_string()), "nginx");
        assert_eq!(refused.get(), 1);
    }

    #[test]
    fn squatted_ports_leave_room_for_real_services() {
        let refused = counter();
        let mut ports = PortLabels::new(4, refused.clone());
        // Unlisted ports (CLOSE_WAIT, remote ports) take at most half the cap.
        assert!(ports.admit(40001) && ports.admit(40002));
        assert!(!ports.admit(40003));
        // Listeners take the rest; a privileged service is never refused.
        ports.set_listening([8080, 8081, 8082]);
        assert!(ports.admit(8080) && ports.admit(8081));
        assert!(!ports.admit(8082), "the cap holds");
        assert!(ports.admit(443) && ports.admit(22));
        assert_eq!(ports.label(8080), "8080");
        assert_eq!(ports.label(9999), OTHER);
        assert_eq!(refused.get(), 3);
    }
}
