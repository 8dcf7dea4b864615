//! The end-to-end tests against an in-process edge, in one test binary: each
//! file was its own once, and a release link with wasmtime costs about half
//! a minute. The tests that read the process-wide metrics recorder or the
//! process's RSS stay binaries of their own (`tests/tests/*.rs`).

mod classes;
mod cluster;
mod config;
mod dashboard;
mod errors;
mod fanout;
mod group;
mod group_storage;
mod hostile;
mod js_client;
mod modules;
mod numbering;
mod protocol;
mod python_filter;
mod reload;
mod resilience;
mod rooms;
mod server_api;
mod session;
mod silence;
mod tenant_limits;
mod wasm;
mod webtransport;
