//! The router's threads: one single-threaded runtime per thread, each serving a copy of every
//! listener, as nginx runs its workers and HAProxy its threads.
//!
//! A connection lives on one thread from accept to close, so its request path takes no lock
//! that another thread's requests take (connection pools are per thread) and wakes no other
//! thread. That is also what lets responses leave in batches (`batch`), which needs a
//! thread's tasks to run in turn. The copies of a listener keep their threads' connection
//! counts even (`spread`).
//!
//! With a thread per core, each is pinned to a core of its own. Unpinned, the kernel may run two
//! router threads on one core while another core runs the rest (seen here: both on one core,
//! the load generator and the instance on the other): every connection of the waiting thread
//! then waits out the other's time slice (4 ms at 250 Hz), and that is the router's p99. The
//! kernel balances by load, and two router threads on one core are as much load as three
//! mostly-sleeping processes on the other. Pinning takes away the kernel's freedom to move a
//! router thread off a core that something else keeps busy; the daemon's `--router-pin false`
//! gives it back.

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::listener::Listener;

/// A listener to serve, when to stop, and whom to tell once it has stopped.
type Job = (Listener, watch::Receiver<bool>, oneshot::Sender<()>);

/// The router's threads.
pub struct Workers {
    jobs: Vec<mpsc::UnboundedSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    /// How many connections each thread serves, on all its listeners.
    loads: Vec<Arc<AtomicUsize>>,
}

/// How to run the router's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkersConfig {
    /// How many threads (at least one).
    pub threads: usize,
    /// Pin thread `i` to the `i`-th core this process may run on (round the list). Unpinned
    /// threads yield their core to others now and then instead (see `yielding`).
    pub pin: bool,
}

impl WorkersConfig {
    /// One thread per core this process may use (as the kernel's affinity mask and CPU quota
    /// allow), pinned as [`WorkersConfig::new`] decides.
    pub fn per_core() -> WorkersConfig {
        WorkersConfig::new(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// `threads` threads, pinned when there is exactly one per core this process may run on
    /// (and more than one core): then every core has a router thread of its own. With fewer
    /// threads than cores the kernel is left to move them to whichever core is free.
    pub fn new(threads: usize) -> WorkersConfig {
        let cores = allowed_cores().map_or(0, |cores| cores.len());
        WorkersConfig {
            threads: threads.max(1),
            pin: threads > 1 && threads == cores,
        }
    }
}

impl Workers {
    /// Starts the threads. They run until the `Workers` is dropped and every listener they
    /// serve has stopped.
    pub fn start(config: WorkersConfig) -> io::Result<Workers> {
        let cores = if config.pin {
            allowed_cores()?
        } else {
            Vec::new()
        };
        let mut workers = Workers {
            jobs: Vec::new(),
            threads: Vec::new(),
            loads: Vec::new(),
        };
        for i in 0..config.threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (send, jobs) = mpsc::unbounded_channel();
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("kiln-router-{i}"))
                .spawn(move || {
                    match core {
                        Some(core) => pin_to(core),
                        None => crate::yielding::watch_this_thread(),
                    }
                    crate::batch::batch_this_thread();
                    runtime.block_on(run(jobs));
                })?;
            workers.jobs.push(send);
            workers.threads.push(thread);
            workers.loads.push(Arc::default());
        }
        Ok(workers)
    }

    /// How many threads serve.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Serves `listener` on every thread (a copy each) until the returned [`Serving`] is
    /// stopped or dropped; then each copy stops accepting and lets its connections finish,
    /// as [`Listener::serve`] does.
    pub fn serve(&self, listener: Listener) -> io::Result<Serving> {
        let (stop, stopped) = watch::channel(false);
        let mut copies = Vec::with_capacity(self.jobs.len());
        for _ in 1..self.jobs.len() {
            copies.push(listener.try_clone()?);
        }
        copies.push(listener);
        // All copies join before any is served: a thread that has not run yet still gets its
        // share of the first connections (they wait in its inbox).
        for (copy, load) in copies.iter_mut().zip(&self.loads) {
            copy.join_ahead(Arc::clone(load));
        }
        let mut done = Vec::with_capacity(copies.len());
        for (jobs, copy) in self.jobs.iter().zip(copies) {
            let (tell, told) = oneshot::channel();
            if jobs.send((copy, stopped.clone(), tell)).is_err() {
                return Err(io::Error::other("a router thread has stopped"));
            }
            done.push(told);
        }
        Ok(Serving { stop, done })
    }
}

impl Drop for Workers {
    /// Lets the threads end once their listeners have stopped; does not wait for them.
    fn drop(&mut self) {
        self.jobs.clear();
        self.threads.clear();
    }
}

/// A listener served by the [`Workers`]; stops when dropped.
pub struct Serving {
    stop: watch::Sender<bool>,
    /// One per copy, told when the copy has stopped.
    done: Vec<oneshot::Receiver<()>>,
}

impl Serving {
    /// Stops accepting on every thread; open connections finish as [`Listener::serve`] says.
    pub fn stop(self) {}

    /// Stops, and waits until every copy's connections have finished (or the apps' drain
    /// timeout passed), as [`Listener::serve`] does.
    pub async fn drain(mut self) {
        let _ = self.stop.send(true);
        for done in std::mem::take(&mut self.done) {
            // An error means the copy's thread is gone: nothing left to wait for.
            let _ = done.await;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A thread's loop: serves each listener it is given, until no more can come and all have
/// stopped.
async fn run(mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut serving = JoinSet::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some((listener, mut stop, done)) => {
                    serving.spawn(async move {
                        listener
                            .serve(async move {
                                // A dropped sender stops the listener too.
                                let _ = stop.wait_for(|stop| *stop).await;
                            })
                            .await;
                        let _ = done.send(());
                    });
                }
                None => break,
            },
            Some(_) = serving.join_next() => {}
        }
    }
    while serving.join_next().await.is_some() {}
}

/// The cores this process may run on.
fn allowed_cores() -> io::Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

fn pin_to(core: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(core);
    if let Err(error) = rustix::thread::sched_setaffinity(None, &set) {
        tracing::warn!(core, %error, "cannot pin a router thread to its core");
    }
}
