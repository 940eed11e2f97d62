//! What the daemon shows: Prometheus metrics ([`metrics`]), connection records
//! ([`report`], [`connections`]), the HTTP routes ([`http`]), the server that bounds what
//! clients may hold ([`server`]) and its TLS/auth configuration ([`web_config`]).

pub mod connections;
pub mod http;
pub mod metrics;
pub mod report;
pub mod server;
pub mod web_config;
