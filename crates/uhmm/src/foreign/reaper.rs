//! The reaper: the thread that frees what the program unmapped behind
//! uhmm's back, which handler threads must not (it waits for page locks).

/// Work the reaper thread runs.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// The thread that runs what handlers must not (waits for page locks):
/// one per space that watches unmaps, started with it. Not started from a
/// handler: creating a thread allocates through the program's `malloc`,
/// which under `uhmm run` may wait for a program thread that waits for
/// this handler.
#[derive(Debug)]
pub(crate) struct Reaper(std::sync::mpsc::Sender<Job>);

impl Reaper {
    /// Starts the thread; it ends when the space (the sender) goes.
    pub(crate) fn start() -> std::io::Result<Reaper> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new().name("uhmm-reaper".into()).spawn(move || {
            for job in rx {
                job();
            }
        })?;
        Ok(Reaper(tx))
    }

    /// Queues `job`; fails once the thread is gone.
    pub(crate) fn send(&self, job: Job) -> Result<(), std::sync::mpsc::SendError<Job>> {
        self.0.send(job)
    }
}
