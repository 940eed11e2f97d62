//! What the daemon shows: Prometheus metrics ([`metrics`]), connection records
//! ([`report`]), the HTTP server ([`http`]) and its TLS/auth configuration
//! ([`web_config`]).

pub mod connections;
pub mod http;
pub mod metrics;
pub mod report;
pub mod web_config;
