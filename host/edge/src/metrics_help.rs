//! The HELP text of every metric the edge records, in one place, so
//! `/metrics` explains itself. Labels: `tenant`, `module` (a short content
//! hash), `class` (a room size class), and a few others named below.

/// Describes every metric to the installed recorder. Once, after install.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    let counters: &[(&str, &str)] = &[
        (
            "throng_connections_total",
            "Connections that completed the QUIC handshake.",
        ),
        (
            "throng_connections_closed_total",
            "Connections the edge closed, by reason.",
        ),
        (
            "throng_connections_refused_total",
            "New connections refused before a slot was given, by reason.",
        ),
        (
            "throng_handshakes_failed_total",
            "QUIC handshakes that failed or timed out, by reason.",
        ),
        (
            "throng_handshake_retries_total",
            "Handshakes asked to prove their address (QUIC Retry) under a crowd.",
        ),
        ("throng_auth_refused_total", "Hello frames whose token was refused."),
        (
            "throng_control_sync_malformed_total",
            "Values in the cluster's control bucket that did not parse or did not match their key (skipped).",
        ),
        (
            "throng_control_sync_failures_total",
            "Modules (what=module) or activations (what=activation) from the cluster this edge could not keep or build.",
        ),
        (
            "throng_bad_frames_total",
            "Connections closed for a frame that did not decode.",
        ),
        (
            "throng_control_frames_refused_total",
            "Control frames refused over the per-connection rate.",
        ),
        (
            "throng_rate_limited_total",
            "Sends refused over the per-user rate, by where (edge or origin).",
        ),
        ("throng_token_refreshes_total", "Tokens refreshed on a live session."),
        (
            "throng_reply_queue_overflows_total",
            "Replies that did not fit a connection's queue (it is closed).",
        ),
        (
            "throng_viewers_evicted_total",
            "Viewers closed for staying behind too long.",
        ),
        (
            "throng_viewer_batches_missed_total",
            "Batches a slow viewer lost (it got newer ones).",
        ),
        (
            "throng_batches_total",
            "Batches encoded by rooms (one per room per tick with news).",
        ),
        ("throng_frames_queued_total", "Batch frames queued to viewers."),
        (
            "throng_paced_fanouts_total",
            "Fanouts spread over their class's pacing window.",
        ),
        (
            "throng_sharded_fanouts_total",
            "Fanouts split into shards on the class's pool.",
        ),
        (
            "throng_room_class_changes_total",
            "Rooms that moved to another size class.",
        ),
        (
            "throng_room_creations_refused_total",
            "Joins refused because a new room would pass a limit, by limit.",
        ),
        (
            "throng_room_messages_total",
            "Messages per room tick, by tenant, class and outcome (accepted, delivered, filtered).",
        ),
        (
            "throng_policy_dropped_total",
            "Accepted messages a policy did not deliver (over the cap), by tenant and class.",
        ),
        (
            "throng_messages_filtered_total",
            "Messages a tenant filter rejected, by tenant and module.",
        ),
        (
            "throng_filter_unjudged_total",
            "Messages of batches a filter could not judge, by tenant, module and on_failure.",
        ),
        (
            "throng_wasm_policy_failures_total",
            "Policy calls that failed (trap, budget, bad plan), by tenant and module.",
        ),
        (
            "throng_wasm_filter_failures_total",
            "Filter calls that failed, by tenant and module.",
        ),
        (
            "throng_wasm_quarantines_total",
            "Modules quarantined, by kind, tenant and module.",
        ),
        (
            "throng_wasm_compilations_total",
            "Modules compiled (not found in the cache).",
        ),
        (
            "throng_wasm_cache_removed_bytes_total",
            "Bytes of compiled code removed from the disk cache (modules refused at upload).",
        ),
        (
            "throng_api_published_total",
            "Messages published through the server API, by tenant.",
        ),
        (
            "throng_upload_compile_milliseconds_total",
            "CPU time tenants' uploads spent compiling (refused ones too), per tenant.",
        ),
        (
            "throng_group_storage_full_total",
            "Group messages refused because their tenant stores all it may on this edge, per tenant.",
        ),
        (
            "throng_admin_evicted_total",
            "Idle admin connections closed to make room for a new one (all places taken).",
        ),
        (
            "throng_admin_unauthenticated_total",
            "Admin API requests refused for want of a valid key or token.",
        ),
        (
            "throng_group_log_commits_total",
            "Group log commits (each may hold many rooms' messages).",
        ),
        (
            "throng_group_log_refused_total",
            "Group room sends refused because the log was behind.",
        ),
        (
            "throng_group_log_store_retries_total",
            "Group log entries stored again after a failed publish.",
        ),
        (
            "throng_group_log_pruned_ticks_total",
            "Group log entries removed by retention.",
        ),
        (
            "throng_group_log_compactions_total",
            "Compactions of the embedded group log.",
        ),
        (
            "throng_group_room_start_failed_total",
            "Group rooms that could not read where their log ends, by tenant.",
        ),
        ("throng_bus_messages_total", "Bus messages, by direction and kind."),
        ("throng_bus_bytes_total", "Bus bytes, by direction and kind."),
        (
            "throng_bus_malformed_total",
            "Bus messages dropped as malformed, by kind.",
        ),
        (
            "throng_bus_refused_total",
            "Bus messages read and not taken (from an edge not live, speaking for another, an unknown tenant, an impossible count), by kind.",
        ),
        (
            "throng_bus_slow_consumer_total",
            "Times the NATS client reported this edge as a slow consumer.",
        ),
        (
            "throng_bus_publish_timeouts_total",
            "Bus publishes that timed out, by kind.",
        ),
        (
            "throng_bus_resyncs_total",
            "Resyncs of a relayed room from its origin, by outcome.",
        ),
        (
            "throng_bus_batches_lost_total",
            "Relayed batches known lost on the bus.",
        ),
        ("throng_resync_refused_total", "Resync requests refused."),
        ("throng_forward_refused_total", "Forwarded sends the origin refused."),
        (
            "throng_forward_timeouts_total",
            "Forwarded sends whose answer did not come in time.",
        ),
        (
            "throng_forward_replies_dropped_total",
            "Answers to forwarded sends that found no sender.",
        ),
        (
            "throng_presence_query_partial_total",
            "Cluster presence queries answered without every edge.",
        ),
        (
            "throng_regions_over_cap_total",
            "Regional viewer counts dropped over the per-room cap of regions.",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(*name, *help);
    }
    let gauges: &[(&str, &str)] = &[
        ("throng_connections", "Authenticated connections open now."),
        ("throng_rooms", "Rooms alive on this edge."),
        (
            "throng_wasm_quarantined",
            "Modules in quarantine now, by kind, tenant and module.",
        ),
        ("throng_group_log_queued", "Group log entries waiting to be stored."),
        ("throng_bus_connected", "1 while the NATS connection is up."),
        (
            "throng_cluster_live_edges",
            "Edges this edge sees alive, itself included.",
        ),
        (
            "throng_cluster_rooms_originated",
            "Rooms alive here that this edge is the origin of.",
        ),
    ];
    for (name, help) in gauges {
        describe_gauge!(*name, *help);
    }
    describe_gauge!(
        "throng_presence_lag_seconds",
        Unit::Seconds,
        "Age of the oldest regional viewer count an origin holds."
    );
    describe_histogram!(
        "throng_policy_call_seconds",
        Unit::Seconds,
        "Time of one policy plan-tick call, by tenant and module."
    );
    describe_histogram!(
        "throng_filter_call_seconds",
        Unit::Seconds,
        "Time of one filter call on a tick's batch, by tenant and module."
    );
}

/// Buckets of the call-latency histograms: 10 µs to 1 s.
pub const CALL_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
