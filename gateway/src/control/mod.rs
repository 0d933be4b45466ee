//! The control plane's state: the config file behind the running snapshot, reload, and the
//! helpers that follow a config (health checkers, the access-log file).
//!
//! Reload: parse and validate the file, build a complete new snapshot (upstreams that did
//! not change are carried over with their idle pools and health), swap it in. An invalid
//! file changes nothing. Requests in flight finish on the snapshot they started with.

pub mod admin;
pub mod exposition;
pub mod global_limits;
pub mod upgrade;

use crate::config::{Config, ConfigErrors};
use crate::telemetry::access_log::{LogWriter, Target};
use crate::upstream::dns::Dns;
use crate::upstream::health::{self, Checker};
use crate::{dataplane::shared::Shared, snapshot::Snapshot};
use gateway_common::names;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct Control {
    pub shared: Arc<Shared>,
    pub config_path: PathBuf,
    pub log: Option<LogWriter>,
    checkers: Mutex<Vec<Checker>>,
    /// Serialises reloads (SIGHUP and POST /reload may race).
    reload_lock: Mutex<()>,
    pub(crate) reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// The attached XDP program, when there is one.
    pub xdp: Mutex<Option<crate::xdp::XdpGuard>>,
    /// Admin connections closed at accept because `admin.max_connections` were open.
    pub(crate) admin_connections_rejected: AtomicU64,
    /// Failed admin accepts (out of descriptors, mostly).
    pub(crate) admin_accept_errors: AtomicU64,
    /// Upstream names: the resolver and each name's addresses.
    pub dns: Arc<Dns>,
    /// `[limits.global]`: the Redis sync task's counters.
    pub(crate) global_sync: global_limits::SyncStats,
}

impl Control {
    pub fn new(
        shared: Arc<Shared>,
        config_path: PathBuf,
        log: Option<LogWriter>,
        dns: Arc<Dns>,
    ) -> Arc<Control> {
        let control = Arc::new(Control {
            shared,
            config_path,
            log,
            checkers: Mutex::new(Vec::new()),
            reload_lock: Mutex::new(()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            xdp: Mutex::new(None),
            admin_connections_rejected: AtomicU64::new(0),
            admin_accept_errors: AtomicU64::new(0),
            dns,
            global_sync: global_limits::SyncStats::default(),
        });
        control.sync_checkers();
        control
    }

    /// Starts checkers for upstreams that have none and stops those of upstreams gone.
    fn sync_checkers(&self) {
        let snap = self.shared.snapshot();
        let mut checkers = self.checkers.lock().unwrap_or_else(|e| e.into_inner());
        checkers.retain(|c| snap.upstreams.iter().any(|u| u.id == c.upstream_id));
        for upstream in &snap.upstreams {
            if !checkers.iter().any(|c| c.upstream_id == upstream.id) {
                if let Some(checker) = health::spawn(upstream.clone()) {
                    checkers.push(checker);
                }
            }
        }
    }

    /// Re-reads the config file. On success returns a one-line summary; on failure every
    /// error, and the running config is untouched. Blocking (it reads files): callers run it
    /// on a thread of its own. Reloads run one at a time; a second caller waits for the
    /// running one, then reloads (re-reading the file, so it sees edits made meanwhile).
    pub fn reload(&self) -> Result<String, ConfigErrors> {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = match Config::load(&self.config_path) {
            Ok(l) => l,
            Err(errors) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                for e in &errors.0 {
                    tracing::error!(error = %e, "reload rejected; the running config keeps serving");
                }
                // logrotate sends SIGHUP whatever state the config file is in: the access
                // log is reopened on the running config's target regardless.
                if let Some(log) = &self.log {
                    let current = Target::from_config(&self.shared.snapshot().config.log.access);
                    if let Err(e) = log.reopen(current) {
                        tracing::error!(error = %e, "cannot reopen the access log");
                    }
                }
                return Err(errors);
            }
        };
        let old = self.shared.snapshot();
        // The access log target must open, but is switched only once the whole reload is
        // known to succeed (a rejected reload keeps logging where it did).
        let access = Target::from_config(&loaded.config.log.access);
        if self.log.is_some() {
            if let Err(e) = crate::telemetry::access_log::check_target(&access) {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                return Err(ConfigErrors(vec![crate::config::ConfigError {
                    file: self.config_path.clone(),
                    line: 0,
                    key: "log.access".into(),
                    message: format!("cannot open the access log: {e}"),
                }]));
            }
        }
        // Names are asked again; one that does not answer keeps its last good addresses.
        // This runs on a blocking thread, never on the runtime's own worker.
        let resolved = block_on(self.dns.resolve_config(&loaded));
        if let Err(errors) = resolved {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
            for e in &errors.0 {
                tracing::error!(error = %e, "reload rejected; the running config keeps serving");
            }
            return Err(errors);
        }
        let dns = self.dns.clone();
        // For the line of an error found after the build (the XDP maps).
        let source = loaded.source.clone();
        let snapshot = match Snapshot::build_resolved(
            loaded,
            old.generation + 1,
            Some(&old),
            &|name| dns.resolved(name),
        ) {
            Ok(s) => s,
            Err(errors) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                for e in &errors.0 {
                    tracing::error!(error = %e, "reload rejected; the running config keeps serving");
                }
                return Err(errors);
            }
        };
        let summary = format!(
            "config generation {} loaded from {}: {} listener(s), {} upstream(s), {} route(s)",
            snapshot.generation,
            self.config_path.display(),
            snapshot.listeners.len(),
            snapshot.upstreams.len(),
            snapshot.router.routes().len()
        );
        // New listen addresses must bind before the config is accepted: workers bind
        // their own SO_REUSEPORT sockets when they see the new snapshot, and cannot
        // report a failure back to whoever asked for the reload.
        let old_addrs = listener_addrs(&old.config);
        for (i, addr) in listener_addrs(&snapshot.config).into_iter().enumerate() {
            if old_addrs.contains(&addr) {
                continue;
            }
            let probe = addr
                .parse()
                .map_err(|e| format!("{e}"))
                .and_then(|a| crate::io::bind_reuseport(a).map_err(|e| e.to_string()));
            if let Err(e) = probe {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                let line = std::fs::read_to_string(&self.config_path)
                    .map(|text| {
                        crate::config::line_of(&text, snapshot.config.listeners[i].span().start)
                    })
                    .unwrap_or(0);
                let error = crate::config::ConfigError {
                    file: self.config_path.clone(),
                    line,
                    key: format!("listener[{i}].listen"),
                    message: format!("cannot bind {addr}: {e}"),
                };
                tracing::error!(%error, "reload rejected; the running config keeps serving");
                return Err(ConfigErrors(vec![error]));
            }
        }
        // A reload applies fully or not at all (as nginx's): the XDP guard's maps are the
        // last thing that can fail, so they go first, and a failure leaves the running
        // config (and its policy, restored in the maps) in force.
        if let Err(error) = self.apply_xdp(&old.config, &snapshot.config, &source) {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "reload rejected; the running config keeps serving");
            return Err(ConfigErrors(vec![error]));
        }
        // The limits before the snapshot: a worker that sees the new snapshot re-checks its
        // open connections against them (`dataplane::conn::h1`), so they must already be
        // in force.
        self.shared.conn_limiter.apply(&snapshot.config.limits);
        self.shared.install(snapshot);
        // Names only the replaced config had are no longer refreshed.
        self.dns.retain(&self.shared.snapshot().config);
        if let Some(log) = &self.log {
            if let Err(e) = log.reopen(access) {
                tracing::error!(error = %e, "cannot reopen the access log");
            }
        }
        self.sync_checkers();
        self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        tracing::info!("{summary}");
        Ok(summary)
    }
}

impl Control {
    /// The DNS refresh: re-resolves each upstream name when its TTL (clamped to the
    /// upstream's bounds) runs out, and installs a snapshot with the upstreams whose
    /// addresses changed rebuilt. Runs on the control runtime for the process's life.
    pub async fn refresh_names(self: Arc<Self>) {
        loop {
            let config = self.shared.snapshot().config.clone();
            let (changed, next) = self.dns.refresh(&config).await;
            if !changed.is_empty() {
                let control = self.clone();
                let _ = tokio::task::spawn_blocking(move || control.apply_names(&changed)).await;
            }
            tokio::time::sleep_until(next.into()).await;
        }
    }

    /// Installs generation + 1 from the current snapshot with only the upstreams named in
    /// `changed` rebuilt from their names' new addresses: servers that stay keep their
    /// health (and, in each worker, their idle connections); removed ones drain.
    /// Serialised with reloads, so neither overwrites the other's snapshot.
    fn apply_names(&self, changed: &[String]) {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.shared.snapshot();
        let snapshot =
            old.with_resolved(old.generation + 1, changed, &|name| self.dns.resolved(name));
        for u in snapshot
            .upstreams
            .iter()
            .filter(|u| changed.contains(&u.name))
        {
            let servers: Vec<&str> = u.servers.iter().map(|s| s.label.as_str()).collect();
            tracing::info!(upstream = %u.name, ?servers, generation = snapshot.generation, "upstream addresses changed");
        }
        self.shared.install(snapshot);
        self.sync_checkers();
    }

    /// Writes the limits and listener ports of `new` into the XDP guard's maps (same
    /// program, maps rewritten in place: counters and buckets are kept). On failure (a map
    /// update refused: a full trie, a map gone) the policy of `old` is written back, so the
    /// maps match the config that keeps serving, and the error names the failed update.
    fn apply_xdp(
        &self,
        old: &Config,
        new: &Config,
        source: &str,
    ) -> Result<(), crate::config::ConfigError> {
        let mut xdp = self.xdp.lock().unwrap_or_else(|e| e.into_inner());
        let Some(guard) = xdp.as_mut() else {
            return Ok(());
        };
        let Err(e) = guard.apply_config(new) else {
            return Ok(());
        };
        // The key whose entries the refused map holds: the deny or allow list (a trie full),
        // else the `[limits]` table as a whole.
        let key = match &e {
            crate::xdp::XdpError::Map { name, .. } => match *name {
                names::DENY_V4 | names::DENY_V6 => "deny",
                names::ALLOW_V4 | names::ALLOW_V6 => "allow",
                _ => "",
            },
            _ => "",
        };
        let mut message = format!("the XDP guard cannot apply the new limits: {}", e.detail());
        if let Err(e) = guard.apply_config(old) {
            // Both failed: the maps may hold a mix. Say so; the next reload rewrites them.
            message.push_str(&format!(
                "; restoring the running limits in the XDP maps failed too ({}): the guard \
                 may enforce a mix of both until a reload succeeds",
                e.detail()
            ));
        }
        Err(crate::config::ConfigError {
            file: self.config_path.clone(),
            line: crate::config::locate_table_key(source, "limits", key),
            key: if key.is_empty() {
                "limits".into()
            } else {
                format!("limits.{key}")
            },
            message,
        })
    }

    /// The admin listener's and the access log's own counters.
    pub(crate) fn render_ops(&self, out: &mut String) {
        use std::fmt::Write;
        let counters = [
            (
                "gateway_admin_connections_rejected_total",
                "Admin connections closed at accept because admin.max_connections were open.",
                self.admin_connections_rejected.load(Ordering::Relaxed),
            ),
            (
                "gateway_admin_accept_errors_total",
                "Failed accepts on the admin listener (e.g. out of file descriptors).",
                self.admin_accept_errors.load(Ordering::Relaxed),
            ),
            (
                "gateway_access_log_dropped_total",
                "Access-log lines dropped because the writer's queue was full.",
                self.log.as_ref().map_or(0, |l| l.dropped()),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
    }

    /// Drops by the XDP guard per limit (deny, conn_rate, max_conns_per_ip,
    /// new_source_rate), for `gateway_limit_rejections_total{enforcer="xdp"}`.
    pub(crate) fn xdp_rejections(&self) -> Vec<(&'static str, u64)> {
        let xdp = self.xdp.lock().unwrap_or_else(|e| e.into_inner());
        match xdp.as_ref().map(|g| g.packet_counts()) {
            Some(Ok(counts)) => counts.limit_rejections().to_vec(),
            _ => Vec::new(),
        }
    }

    /// XDP verdict counters (summed over CPUs) and which enforcer is active.
    pub(crate) fn render_xdp(&self, out: &mut String) {
        use std::fmt::Write;
        let xdp = self.xdp.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP gateway_xdp_packets_total Packets seen by the XDP program, by verdict.\n# TYPE gateway_xdp_packets_total counter"
        );
        if let Some(guard) = xdp.as_ref() {
            if let Ok(counts) = guard.packet_counts() {
                for (verdict, counter) in counts.iter() {
                    let _ = writeln!(
                        out,
                        "gateway_xdp_packets_total{{verdict=\"{verdict}\"}} {}",
                        counter.packets
                    );
                }
            }
        }
        if let Some(Ok(fill)) = xdp.as_ref().map(|g| g.map_fill()) {
            let _ = writeln!(out, "# HELP gateway_xdp_map_entries Entries in each XDP map.\n# TYPE gateway_xdp_map_entries gauge");
            for f in &fill {
                let _ = writeln!(
                    out,
                    "gateway_xdp_map_entries{{map=\"{}\"}} {}",
                    f.map.to_ascii_lowercase(),
                    f.entries
                );
            }
            let _ = writeln!(out, "# HELP gateway_xdp_map_capacity Capacity of each XDP map.\n# TYPE gateway_xdp_map_capacity gauge");
            for f in &fill {
                let _ = writeln!(
                    out,
                    "gateway_xdp_map_capacity{{map=\"{}\"}} {}",
                    f.map.to_ascii_lowercase(),
                    f.capacity
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP gateway_limit_enforcer Which enforcer applies the per-IP limits (1 = active).\n# TYPE gateway_limit_enforcer gauge\ngateway_limit_enforcer{{enforcer=\"xdp\"}} {}\ngateway_limit_enforcer{{enforcer=\"userspace\"}} {}",
            u8::from(xdp.is_some()),
            u8::from(xdp.is_none())
        );
    }
}

/// Runs `work` to completion from a blocking thread: on the control runtime when there is
/// one (a reload from SIGHUP or `POST /reload`), else on a runtime of its own (an embedder
/// calling `reload` from a plain thread).
fn block_on<F: std::future::Future>(work: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(work),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
            .block_on(work),
    }
}

fn listener_addrs(config: &Config) -> Vec<String> {
    config
        .listeners
        .iter()
        .map(|l| l.get_ref().listen.clone())
        .collect()
}
