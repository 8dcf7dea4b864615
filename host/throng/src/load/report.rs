//! The report of a load run: one JSON object (`--json`) or text.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct RunReport {
    /// `edge` or `bare-quinn`.
    pub mode: &'static str,
    pub target: Target,
    pub params: Params,
    pub connections: Connections,
    /// Length of the measured window, seconds.
    pub window_s: f64,
    pub delivery: Delivery,
    /// Send → receive, in µs, over messages delivered in the window.
    pub latency_us: Option<Latency>,
    pub sends: Option<Sends>,
    pub churn: Option<Churn>,
    /// The server process (the edge, or the bare-quinn baseline); absent
    /// for an external server without `--edge-pid`.
    pub server: Option<ServerUsage>,
    /// This load generator, to tell whether it was the bottleneck.
    pub loadgen: LoadgenUsage,
    pub errors: Errors,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub addr: String,
    pub spawned: bool,
    pub pid: Option<u32>,
    /// `taskset -c` list the spawned server was pinned to.
    pub server_cpus: Option<String>,
    /// The edge config used: a path, or `generated`.
    pub config: String,
}

#[derive(Debug, Serialize)]
pub struct Params {
    pub viewers: usize,
    pub rooms: usize,
    pub senders: usize,
    pub rate: f64,
    pub mix: String,
    pub body_bytes: usize,
    pub churn: f64,
    pub churn_connections: usize,
    pub handshakes_in_flight: usize,
    pub endpoints: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// The room tick, when the config in use is known.
    pub tick_ms: Option<f64>,
    pub viewer_cap_per_sec: Option<u32>,
    /// `wasm`, `native` or `config` (whatever the given config says).
    pub policy: String,
    /// Bare-quinn: bytes per frame on the wire, length prefix included.
    pub frame_bytes: Option<usize>,
    /// `given`, `estimated` or `measured` (from the edge run of the pair).
    pub frame_bytes_source: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct Connections {
    /// Viewers, senders and churners asked for.
    pub requested: u64,
    pub viewers_requested: u64,
    /// Viewers connected and in their room when the window opened.
    pub viewers_connected: u64,
    /// Every connection whose handshake (and Hello) succeeded.
    pub opened: u64,
    pub failed: u64,
    pub join_failed: u64,
    /// From the first handshake started to the last one finished.
    pub setup_s: f64,
    pub handshakes_per_sec: f64,
    /// The server's CPU seconds from before the first handshake to the end
    /// of setup (handshakes, Hello, joins, a short settle), when its pid is
    /// known.
    pub server_cpu_s: Option<f64>,
    /// Connections opened per second of server CPU: the rate one server
    /// core sustains, whatever limited the wall-clock rate.
    pub handshakes_per_server_cpu_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Delivery {
    /// Batches (bare-quinn: frames) received by viewers in the window.
    pub frames: u64,
    pub frames_per_sec: f64,
    pub messages: u64,
    pub messages_per_sec: f64,
    /// Messages (bare-quinn: frames) per second received by one viewer.
    pub per_viewer_per_sec: Spread,
    /// Sum of `batch.missed`: batches the edge dropped for slow viewers.
    pub missed: u64,
    /// Average encoded batch frame, length prefix included, from one viewer per room.
    pub avg_frame_bytes: Option<f64>,
    /// Bare-quinn: stream bytes received in the window.
    pub bytes: u64,
    /// Delivered messages without this run's stamp.
    pub unstamped: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub mean: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut values: Vec<f64>) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            min: values[0],
            median,
            mean: values.iter().sum::<f64>() / n as f64,
            max: values[n - 1],
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
        (!h.is_empty()).then(|| Latency {
            samples: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Sends {
    /// Sent in the window, and what became of them.
    pub sent: u64,
    pub sent_per_sec: f64,
    pub acked: u64,
    pub rejected: u64,
    pub rejected_by: BTreeMap<String, u64>,
    /// The connection failed before the answer came.
    pub lost: u64,
    /// No answer within the drain time after the run.
    pub unanswered: u64,
    /// Not sent because a sender fell more than a second behind its rate.
    pub skipped: u64,
}

#[derive(Debug, Serialize)]
pub struct Churn {
    pub target_joins_per_sec: f64,
    pub joins: u64,
    pub leaves: u64,
    pub joins_plus_leaves_per_sec: f64,
    pub join_latency_us: Option<Latency>,
    pub errors: u64,
}

#[derive(Debug, Serialize)]
pub struct ServerUsage {
    /// The process measured through /proc, or
    pub pid: Option<u32>,
    /// the edge's admin endpoint measured through `/stats`.
    pub stats_url: Option<String>,
    /// utime + stime spent in the window.
    pub cpu_s: f64,
    /// cpu_s / window_s: 1.0 is one core busy.
    pub cores: f64,
    pub us_cpu_per_frame: Option<f64>,
    pub us_cpu_per_message: Option<f64>,
    pub rss_before_connect_kib: Option<u64>,
    /// After every connection was set up and joined, before traffic.
    pub rss_after_connect_kib: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
    pub rss_end_kib: u64,
    /// VmHWM at the end of the window: the peak over the server's life.
    pub peak_rss_kib: u64,
}

#[derive(Debug, Serialize)]
pub struct LoadgenUsage {
    pub cpu_s: f64,
    pub cores: f64,
    /// Cores the rest of the machine kept busy in the window (all CPUs busy
    /// minus the server and this process): above ~0.1 the figures were
    /// taken on a shared machine.
    pub other_cores: f64,
}

#[derive(Debug, Serialize)]
pub struct Errors {
    pub stream_errors: u64,
    pub first: Option<String>,
}

/// A/B pairs of edge and bare-quinn runs.
#[derive(Debug, Serialize)]
pub struct CompareReport {
    pub mode: &'static str,
    pub pairs: Vec<Pair>,
    /// Edge µs per frame over bare-quinn µs per frame, across pairs.
    pub cpu_per_frame_ratio: Option<Spread>,
    /// Edge RSS per connection over bare-quinn's, across pairs.
    pub rss_per_connection_ratio: Option<Spread>,
    pub runs: Vec<RunReport>,
}

#[derive(Debug, Serialize)]
pub struct Pair {
    pub frame_bytes: usize,
    pub edge_us_per_frame: Option<f64>,
    pub bare_us_per_frame: Option<f64>,
    pub cpu_per_frame_ratio: Option<f64>,
    pub edge_rss_per_connection_bytes: Option<f64>,
    pub bare_rss_per_connection_bytes: Option<f64>,
    pub rss_per_connection_ratio: Option<f64>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

impl RunReport {
    pub fn print_text(&self) {
        let p = &self.params;
        let c = &self.connections;
        let d = &self.delivery;
        println!(
            "throng load: {} at {} ({}{}), config {}",
            self.mode,
            self.target.addr,
            if self.target.spawned { "spawned" } else { "external" },
            self.target
                .server_cpus
                .as_ref()
                .map_or(String::new(), |c| format!(", pinned to CPU {c}")),
            self.target.config
        );
        if self.mode == "bare-quinn" {
            println!(
                "  load: {} viewers, one stream each, tick {}",
                p.viewers,
                p.tick_ms.map_or("?".into(), |t| format!("{t} ms"))
            );
        } else {
            println!(
                "  load: {} viewers in {} rooms, {} senders at {} msg/s ({}), {} B bodies, churn {}/s, tick {}, cap {}, policy {}",
                p.viewers,
                p.rooms,
                p.senders,
                p.rate,
                p.mix,
                p.body_bytes,
                p.churn,
                p.tick_ms.map_or("?".into(), |t| format!("{t} ms")),
                p.viewer_cap_per_sec
                    .map_or("?".into(), |c| if c == 0 { "off".into() } else { c.to_string() }),
                p.policy,
            );
        }
        if let (Some(f), Some(src)) = (p.frame_bytes, p.frame_bytes_source) {
            println!("  frame: {f} B per tick ({src})");
        }
        println!(
            "  connections: {} opened, {} failed, {} joins failed; {}/{} viewers in; setup {:.2} s = {:.0} handshakes/s",
            c.opened,
            c.failed,
            c.join_failed,
            c.viewers_connected,
            c.viewers_requested,
            c.setup_s,
            c.handshakes_per_sec
        );
        if let (Some(cpu), Some(per_cpu)) = (c.server_cpu_s, c.handshakes_per_server_cpu_s) {
            println!("  setup used {cpu:.2} s of server CPU = {per_cpu:.0} connections per server CPU second");
        }
        println!(
            "  window {:.2} s: {} frames ({:.0}/s), {} messages ({:.0}/s), missed {}{}",
            self.window_s,
            d.frames,
            d.frames_per_sec,
            d.messages,
            d.messages_per_sec,
            d.missed,
            d.avg_frame_bytes
                .map_or(String::new(), |b| format!(", avg frame {b:.0} B"))
        );
        let pv = &d.per_viewer_per_sec;
        println!(
            "  {} per viewer per second: min {:.1}, median {:.1}, max {:.1}",
            if self.mode == "bare-quinn" {
                "frames"
            } else {
                "messages"
            },
            pv.min,
            pv.median,
            pv.max
        );
        if let Some(l) = &self.latency_us {
            println!(
                "  latency: p50 {}, p99 {}, p999 {}, max {} ({} samples)",
                ms(l.p50),
                ms(l.p99),
                ms(l.p999),
                ms(l.max),
                l.samples
            );
        }
        if let Some(s) = &self.sends {
            println!(
                "  sends: {} ({:.0}/s), {} acked, {} rejected {:?}, {} lost, {} unanswered, {} skipped",
                s.sent, s.sent_per_sec, s.acked, s.rejected, s.rejected_by, s.lost, s.unanswered, s.skipped
            );
        }
        if let Some(ch) = &self.churn {
            println!(
                "  churn: {} joins + {} leaves = {:.0}/s (asked {} joins/s), join p99 {}, {} errors",
                ch.joins,
                ch.leaves,
                ch.joins_plus_leaves_per_sec,
                ch.target_joins_per_sec,
                ch.join_latency_us.as_ref().map_or("-".into(), |l| ms(l.p99)),
                ch.errors
            );
        }
        match &self.server {
            Some(s) => {
                println!(
                    "  server {}: {:.3} CPU s ({:.2} cores), {} µs/frame, {} µs/message",
                    s.pid
                        .map(|p| format!("pid {p}"))
                        .or_else(|| s.stats_url.clone())
                        .unwrap_or_default(),
                    s.cpu_s,
                    s.cores,
                    opt(s.us_cpu_per_frame, 2),
                    opt(s.us_cpu_per_message, 3)
                );
                println!(
                    "  server RSS: {} KiB before, {} KiB connected ({} B/connection), {} KiB at end, peak {} KiB",
                    s.rss_before_connect_kib.map_or("-".into(), |v| v.to_string()),
                    s.rss_after_connect_kib.map_or("-".into(), |v| v.to_string()),
                    opt(s.rss_per_connection_bytes, 0),
                    s.rss_end_kib,
                    s.peak_rss_kib
                );
            }
            None => println!("  server: no PID to measure (give --edge-pid)"),
        }
        println!(
            "  load generator: {:.3} CPU s ({:.2} cores); other processes: {:.2} cores",
            self.loadgen.cpu_s, self.loadgen.cores, self.loadgen.other_cores
        );
        if self.errors.stream_errors > 0 || self.errors.first.is_some() {
            println!(
                "  errors: {} streams ended early; first: {}",
                self.errors.stream_errors,
                self.errors.first.as_deref().unwrap_or("-")
            );
        }
    }
}

impl CompareReport {
    pub fn print_text(&self) {
        for run in &self.runs {
            run.print_text();
            println!();
        }
        println!("edge vs bare-quinn, A/B pairs:");
        for (i, p) in self.pairs.iter().enumerate() {
            println!(
                "  pair {}: frame {} B; CPU µs/frame edge {} / bare {} = {}; RSS B/connection edge {} / bare {} = {}",
                i + 1,
                p.frame_bytes,
                opt(p.edge_us_per_frame, 2),
                opt(p.bare_us_per_frame, 2),
                opt(p.cpu_per_frame_ratio, 2),
                opt(p.edge_rss_per_connection_bytes, 0),
                opt(p.bare_rss_per_connection_bytes, 0),
                opt(p.rss_per_connection_ratio, 2),
            );
        }
        let spread = |s: &Option<Spread>| {
            s.map_or("-".into(), |s| {
                format!("median {:.2} (min {:.2}, max {:.2})", s.median, s.min, s.max)
            })
        };
        println!("  CPU per frame ratio: {}", spread(&self.cpu_per_frame_ratio));
        println!("  RSS per connection ratio: {}", spread(&self.rss_per_connection_ratio));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = Spread::of(vec![4.0, 1.0, 2.0, 3.0]).expect("values");
        assert_eq!(s.median, 2.5);
        assert!(Spread::of(Vec::new()).is_none());
    }
}
