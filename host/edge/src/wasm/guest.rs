//! What every guest instance's store holds: a locked-down WASI p2 context,
//! memory limits, the budget deadline, and the host imports (log, clock,
//! config).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{Level, policy::throng::room::host};

/// Longest line a guest may log at once; the rest is cut.
const MAX_LOG_LINE: usize = 1024;

/// Per-store state of one guest instance.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: StoreLimits,
    /// The room (`tenant/room`) or tenant this instance serves, for logs.
    label: Arc<str>,
    /// Short content hash of the module, for logs.
    module: Arc<str>,
    params: Vec<(String, String)>,
    /// When the current call's budget runs out (epoch mode).
    pub(super) deadline: Instant,
}

impl std::fmt::Debug for GuestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestState")
            .field("label", &self.label)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl GuestState {
    pub fn new(label: Arc<str>, module: Arc<str>, params: Vec<(String, String)>, limits: StoreLimits) -> Self {
        // No preopened directories, no environment, no arguments, no network
        // and no name lookups; stdout and stderr go to the edge's log.
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .stdout(LogStream {
                label: Arc::clone(&label),
                module: Arc::clone(&module),
                stream: "stdout",
            })
            .stderr(LogStream {
                label: Arc::clone(&label),
                module: Arc::clone(&module),
                stream: "stderr",
            })
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limits,
            label,
            module,
            params,
            deadline: Instant::now(),
        }
    }

    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for GuestState {
    fn log(&mut self, level: Level, message: String) {
        let message = &message[..message.floor_char_boundary(MAX_LOG_LINE)];
        let (label, module) = (&*self.label, &*self.module);
        match level {
            Level::Trace => tracing::trace!(target: "throng::guest", %label, %module, "{message}"),
            Level::Debug => tracing::debug!(target: "throng::guest", %label, %module, "{message}"),
            Level::Info => tracing::info!(target: "throng::guest", %label, %module, "{message}"),
            Level::Warn => tracing::warn!(target: "throng::guest", %label, %module, "{message}"),
            Level::Error => tracing::error!(target: "throng::guest", %label, %module, "{message}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        crate::unix_now_ms()
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.params.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
    }
}

impl super::bindings::policy::throng::room::types::Host for GuestState {}

/// A guest's stdout or stderr, written to the log a chunk at a time.
#[derive(Clone)]
struct LogStream {
    label: Arc<str>,
    module: Arc<str>,
    stream: &'static str,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let text = String::from_utf8_lossy(buf);
        let text = text.trim_end();
        let text = &text[..text.floor_char_boundary(MAX_LOG_LINE)];
        if !text.is_empty() {
            tracing::info!(target: "throng::guest", label = %self.label, module = %self.module, stream = self.stream, "{text}");
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
