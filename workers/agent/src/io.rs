//! A small runtime for the network I/O of synchronous backends (object stores, model and reward
//! servers): backends run on blocking threads and wait here for their futures.

use std::future::Future;
use std::sync::OnceLock;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("backend-io")
            .enable_all()
            .build()
            .expect("backend I/O runtime")
    })
}

/// Runs a future (object store or HTTP I/O) on this runtime and waits for it from any
/// thread.
pub(crate) fn block_on<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    runtime().spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().expect("backend I/O task finished")
}
