//! One socket while it is tracked: what its verdict and `/connections` need, compactly
//! (see **Size** in the tracker's documentation).

use std::{net::SocketAddr, num::NonZeroU64, sync::Arc};

use crate::{
    capture::decode::StateChange,
    classify::{Close, ResetList, Role, Transition},
    owner::process::Process,
    tcp::TcpState,
    track::compact::{Address, StatePath},
};

/// Per-socket state while it is tracked .
#[derive(Clone, Debug)]
pub(super) struct Tracked {
    pub(super) state: TcpState,
    pub(super) role: Option<Role>,
    pub(super) states: StatePath,
    /// [`History::last_change`], split so that its parts fill gaps in this struct.
    pub(super) last_change_ns: u64,
    pub(super) last_change: Option<(TcpState, TcpState)>,
    /// CLOCK_MONOTONIC of the open; `None` for sockets opened before we started (an
    /// event at time 0 cannot happen: the clock runs from boot).
    pub(super) opened_ns: Option<NonZeroU64>,
    pub(super) netns: u32,
    pub(super) cookie: u64,
    pub(super) local: Address,
    pub(super) remote: Address,
    pub(super) owner: Option<Arc<Process>>,
    pub(super) end: Option<Box<End>>,
}

/// F and the RSTs seen: the evidence the classifier decides on besides the transitions.
/// RSTs come right before or after F, so most sockets never need it.
#[derive(Clone, Debug, Default)]
pub(super) struct End {
    pub(super) close: Option<Close>,
    pub(super) resets: ResetList,
}

impl Tracked {
    pub(super) fn new(
        role: Option<Role>,
        opened_ns: Option<NonZeroU64>,
        change: &StateChange,
    ) -> Self {
        Self {
            state: change.old,
            role,
            states: StatePath::default(),
            last_change_ns: 0,
            last_change: None,
            opened_ns,
            netns: change.netns,
            cookie: change.cookie,
            local: change.local.into(),
            remote: change.remote.into(),
            owner: None,
            end: None,
        }
    }

    pub(super) fn close(&self) -> Option<&Close> {
        self.end.as_ref()?.close.as_ref()
    }

    pub(super) fn is_closed(&self) -> bool {
        self.close().is_some()
    }

    /// Records a transition: the states path, and what the classifier needs of it.
    pub(super) fn record(&mut self, change: &StateChange) {
        // A socket born while we watched starts in its first new state (a client was
        // never meaningfully "close", a child never "listen"); one opened before we
        // started starts where we first saw it.
        if self.states.is_empty() && self.opened_ns.is_none() {
            self.states.push(change.old);
        }
        self.states.push(change.new);
        if change.old != change.new && change.new != TcpState::Close {
            self.last_change = Some((change.old, change.new));
            self.last_change_ns = change.timestamp_ns;
        }
    }

    pub(super) fn last_change(&self) -> Option<Transition> {
        let (old, new) = self.last_change?;
        Some(Transition { old, new, timestamp_ns: self.last_change_ns })
    }

    pub(super) fn opened_ns(&self) -> Option<u64> {
        self.opened_ns.map(NonZeroU64::get)
    }

    /// Keeps the best-known 4-tuple: SYN_SENT has no local port yet, and on kernels
    /// before 6.13 a new child's first event carries the listener's addresses.
    pub(super) fn learn_addresses(&mut self, change: &StateChange) {
        let mut local = SocketAddr::from(self.local);
        if change.local.port() != 0 && !change.local.ip().is_unspecified() {
            self.local = change.local.into();
        } else if local.port() == 0 {
            local.set_port(change.local.port());
            self.local = local.into();
        }
        if change.remote.port() != 0 {
            self.remote = change.remote.into();
        }
        // Likewise its cookie: up to 6.12 that first event shows the listener's.
        if change.cookie != 0 {
            self.cookie = change.cookie;
        }
        if self.netns == 0 {
            self.netns = change.netns;
        }
    }
}
