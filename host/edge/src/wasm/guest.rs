//! What every guest instance's store holds: a locked-down WASI p2 context,
//! memory limits, the call's CPU budget, and the host imports (log, clock,
//! config).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::ThreadId;
use std::time::Duration;

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
    /// What is left of the current call's budget (epoch mode).
    pub(super) budget: CpuBudget,
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
            budget: CpuBudget::default(),
        }
    }

    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }
}

/// The CPU time a call may still use (epoch mode). A guest is charged the
/// CPU time of the thread it runs on, from the start of the call or its
/// last resume to each epoch tick, and not the time it waits for a worker
/// after yielding: on a busy edge that wait is long, and a wall-clock
/// deadline failed healthy policies and filters (a plan of microseconds was
/// cut off at 23 ms) and made filters fail closed for nothing.
#[derive(Debug, Default)]
pub(super) struct CpuBudget {
    left: Duration,
    /// Where the guest last started running; set again by the yield
    /// future, which cannot borrow the store.
    since: Arc<Mutex<Option<Mark>>>,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    thread: ThreadId,
    cpu: Duration,
}

impl Mark {
    fn now() -> Self {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Self {
            thread: std::thread::current().id(),
            cpu: Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32),
        }
    }
}

impl CpuBudget {
    /// Starts a call with `limit` of CPU time.
    pub(super) fn arm(&mut self, limit: Duration) {
        self.left = limit;
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Mark::now());
    }

    /// Charges what the guest ran since its last mark (at most `tick` when
    /// it moved threads, whose CPU clocks do not compare); true once the
    /// budget is spent.
    pub(super) fn charge(&mut self, tick: Duration) -> bool {
        let now = Mark::now();
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        let ran = match *since {
            Some(m) if m.thread == now.thread => now.cpu.saturating_sub(m.cpu),
            _ => tick,
        };
        *since = Some(now);
        self.left = self.left.saturating_sub(ran);
        self.left.is_zero()
    }

    /// Yields once to the runtime, then marks where the guest resumes.
    pub(super) fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let since = Arc::clone(&self.since);
        Box::pin(async move {
            tokio::task::yield_now().await;
            *since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Mark::now());
        })
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const TICK: Duration = Duration::from_millis(1);

    /// Burns CPU on this thread until `budget` says it is spent; bounded in
    /// wall time.
    fn spin_until_spent(budget: &mut CpuBudget) -> Duration {
        let started = Instant::now();
        while !budget.charge(TICK) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a 5 ms budget never ran out"
            );
            std::hint::black_box((0..1000u64).sum::<u64>());
        }
        started.elapsed()
    }

    #[test]
    fn waiting_is_not_charged_and_running_is() {
        let mut budget = CpuBudget::default();
        budget.arm(Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!budget.charge(TICK), "30 ms asleep spent a 5 ms CPU budget");
        let ran = spin_until_spent(&mut budget);
        assert!(ran >= Duration::from_millis(4), "spent after {ran:?} of running");
    }

    #[test]
    fn a_resume_on_another_thread_is_charged_one_tick() {
        // Other threads' CPU clocks do not compare: each hop costs a tick.
        let hop = |mut budget: CpuBudget| {
            std::thread::spawn(move || {
                let spent = budget.charge(TICK);
                (budget, spent)
            })
            .join()
            .expect("thread")
        };
        let mut budget = CpuBudget::default();
        budget.arm(Duration::from_millis(3));
        let (budget, spent) = hop(budget);
        assert!(!spent, "one tick of three");
        let (budget, spent) = hop(budget);
        assert!(!spent, "two ticks of three");
        let (_, spent) = hop(budget);
        assert!(spent, "three ticks of three");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_yield_future_marks_where_the_guest_resumes() {
        let mut budget = CpuBudget::default();
        budget.arm(Duration::from_millis(5));
        let resume = budget.yield_now();
        std::thread::sleep(Duration::from_millis(30));
        resume.await;
        assert!(!budget.charge(TICK), "time before the resume is not charged");
    }
}
