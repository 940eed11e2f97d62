//! Merging the CPUs' rings into one stream in timestamp order.
//!
//! Each CPU has its own ring, and one socket's records may be made on different CPUs.
//! A ring is in reservation order, which is timestamp order but for a hit nested between
//! another program's clock reading and its reservation (a different socket's, which
//! then waits behind it); the reader decides up to which instant every ring has been
//! read ([`super::reader`]), and this hands on what lies before it.

use std::collections::VecDeque;

use crate::capture::decode::SocketEvent;

/// Hands on, oldest first, the events of `held` stamped by `until`: the ring whose first
/// event is the oldest hands on its events up to the next ring's first one, a run at a
/// time, so the rings are compared once per run rather than once per event. (A ring is
/// in reservation order, which is timestamp order but for a hit nested between another's
/// clock reading and reservation: a different socket, which waits behind it.)
pub fn merge(
    held: &mut [VecDeque<SocketEvent>],
    until: u64,
    mut hand_on: impl FnMut(&SocketEvent),
) {
    while let Some((oldest, next_ns)) = oldest_ring(held, until) {
        let run_until = next_ns.min(until);
        let events = &mut held[oldest];
        while let Some(event) = events.front().filter(|event| event.timestamp_ns() <= run_until) {
            hand_on(event);
            events.pop_front();
        }
    }
}

/// The ring whose first event is the oldest, if that event was stamped by `until`, and
/// the oldest first event of the other rings (`u64::MAX` if none).
fn oldest_ring(held: &[VecDeque<SocketEvent>], until: u64) -> Option<(usize, u64)> {
    let mut oldest: Option<(usize, u64)> = None;
    let mut next_ns = u64::MAX;
    for (index, events) in held.iter().enumerate() {
        let Some(stamp) = events.front().map(SocketEvent::timestamp_ns) else { continue };
        match oldest {
            Some((_, oldest_ns)) if stamp >= oldest_ns => next_ns = next_ns.min(stamp),
            _ => {
                if let Some((_, previous_ns)) = oldest {
                    next_ns = next_ns.min(previous_ns);
                }
                oldest = Some((index, stamp));
            }
        }
    }
    oldest.filter(|&(_, stamp)| stamp <= until).map(|(index, _)| (index, next_ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{capture::decode::Accepted, owner::Process};

    fn ring(stamps: &[u64]) -> VecDeque<SocketEvent> {
        let owner = Process { pid: 1, tid: 1, comm: Default::default(), cgroup_id: 0 };
        stamps
            .iter()
            .map(|&timestamp_ns| {
                SocketEvent::Accepted(Accepted { timestamp_ns, socket: 1, cookie: 1, owner })
            })
            .collect()
    }

    #[test]
    fn the_oldest_first_event_leads_up_to_the_next_rings_first() {
        let held = [ring(&[30, 40]), ring(&[]), ring(&[10, 50]), ring(&[20])];
        assert_eq!(oldest_ring(&held, u64::MAX), Some((2, 20)));
        assert_eq!(oldest_ring(&held, 10), Some((2, 20)));
        assert_eq!(oldest_ring(&held[..1], u64::MAX), Some((0, u64::MAX)));
    }

    #[test]
    fn nothing_leads_past_the_horizon() {
        assert_eq!(oldest_ring(&[ring(&[30]), ring(&[20])], 19), None);
        assert_eq!(oldest_ring(&[ring(&[]), ring(&[])], u64::MAX), None);
    }

    fn merged(mut held: Vec<VecDeque<SocketEvent>>, until: u64) -> Vec<u64> {
        let mut out = Vec::new();
        merge(&mut held, until, |event| out.push(event.timestamp_ns()));
        out
    }

    #[test]
    fn runs_merge_into_timestamp_order_up_to_the_horizon() {
        let held = vec![ring(&[1, 2, 3, 7, 8]), ring(&[4, 5, 6, 9]), ring(&[])];
        assert_eq!(merged(held.clone(), u64::MAX), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(merged(held, 6), [1, 2, 3, 4, 5, 6]);
    }
}
