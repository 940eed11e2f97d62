//! Follows each socket from its first event to the moment its verdict can be given
//! ([`tracker`]), in bounded memory.

pub mod compact;
pub mod tracker;
