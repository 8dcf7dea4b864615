//! One thread pool per room size class.
//!
//! A room runs on its class's pool: its tick, policy, encode and push (a
//! huge room's push in shards, one per thread of the pool), and the writer
//! tasks that move its batches into its viewers' streams. A huge
//! room's 10,000 writer wake-ups per tick then queue on the huge class's
//! threads, not ahead of a small room's few; the OS shares the cores
//! between the pools. QUIC itself (quinn's endpoint and connection drivers)
//! stays on the edge's main runtime, because a connection may be in rooms
//! of several classes; that shared part is why a huge class also paces its
//! pushes (`spread`, see the room's fanout). A class with `workers = 0` runs on the
//! main runtime: no thread hop per write, no isolation.

use tokio::runtime::{Builder, Handle, Runtime};

use crate::config::RoomClass;

/// The pools, in class order.
pub struct ClassWorkers {
    pools: Vec<Pool>,
    /// Where classes with `workers = 0` run: the edge's main threads.
    main: Handle,
}

struct Pool {
    name: String,
    /// `None` for a class on the main threads, and once dropped.
    runtime: Option<Runtime>,
}

impl ClassWorkers {
    /// Starts `class.workers` threads for every class; a class with none
    /// shares the threads of the runtime this is called on.
    pub fn start(classes: &[RoomClass]) -> std::io::Result<Self> {
        let mut pools = Vec::with_capacity(classes.len());
        for class in classes {
            let runtime = match class.workers {
                0 => None,
                n => Some(
                    Builder::new_multi_thread()
                        .worker_threads(n)
                        .thread_name(format!("room-{}", class.name))
                        .enable_all()
                        .build()?,
                ),
            };
            pools.push(Pool {
                name: class.name.clone(),
                runtime,
            });
        }
        Ok(Self {
            pools,
            main: Handle::current(),
        })
    }

    /// Where rooms of each class run, in class order.
    ///
    /// Rooms get handles, not the pools: room tasks hold the rooms, so
    /// pools owned by them would never stop. The edge owns the pools; once
    /// they are dropped a handle spawns nothing.
    pub fn handles(&self) -> Pools {
        Pools(
            self.pools
                .iter()
                .map(|p| {
                    p.runtime
                        .as_ref()
                        .map_or_else(|| self.main.clone(), |r| r.handle().clone())
                })
                .collect(),
        )
    }
}

/// Handles to the class pools.
#[derive(Debug, Clone)]
pub struct Pools(Vec<Handle>);

impl Pools {
    /// Where rooms of class `class` run (the last pool for an unknown class).
    pub fn get(&self, class: usize) -> Handle {
        match self.0.get(class).or(self.0.last()) {
            Some(pool) => pool.clone(),
            // No classes at all cannot come out of Config; run where we are.
            None => Handle::current(),
        }
    }
}

impl std::fmt::Debug for ClassWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.pools.iter().map(|p| &p.name)).finish()
    }
}

impl Drop for ClassWorkers {
    fn drop(&mut self) {
        // Dropping a Runtime blocks, and panics inside async code (where
        // the edge is dropped); shutting down in the background does
        // neither, and every room has finished by then anyway.
        for runtime in self.pools.iter_mut().filter_map(|p| p.runtime.take()) {
            runtime.shutdown_background();
        }
    }
}
