//! An ordered parallel map with bounded memory: one producer thread, `workers` worker threads,
//! and an in-order consumer on the calling thread. Pack and unpack both run on it.

use std::collections::BTreeMap;
use std::thread;

use crossbeam_channel::{bounded, Receiver, Sender};

/// Runs `produce` → `work` (in parallel) → `consume` (in the producer's order). Each worker
/// thread gets its own `work` closure from `make_worker`, so it can keep state such as a
/// compression context.
///
/// At most `max_in_flight` jobs exist between the producer and the consumer at any moment, so
/// memory stays bounded however slow one worker is. The first error from any stage stops the
/// others: their channels close, and every blocked send or receive returns.
pub(crate) fn run<J, R, E, P, M, W, C>(
    workers: usize,
    max_in_flight: usize,
    produce: P,
    make_worker: M,
    mut consume: C,
) -> Result<(), E>
where
    J: Send,
    R: Send,
    E: Send,
    P: FnOnce(&mut dyn FnMut(J) -> bool) -> Result<(), E> + Send,
    M: Fn() -> W + Sync,
    W: FnMut(J) -> Result<R, E>,
    C: FnMut(R) -> Result<(), E>,
{
    let workers = workers.max(1);
    let max_in_flight = max_in_flight.max(workers);
    let (job_tx, job_rx) = bounded::<(u64, J)>(workers);
    let (result_tx, result_rx) = bounded::<(u64, Result<R, E>)>(max_in_flight);
    // One token per job in flight: the producer puts one in before each job, the consumer takes
    // one out after consuming a result.
    let (token_tx, token_rx) = bounded::<()>(max_in_flight);

    thread::scope(|scope| {
        let producer = scope.spawn(move || {
            let mut seq = 0u64;
            let mut submit = |job: J| -> bool {
                if token_tx.send(()).is_err() || job_tx.send((seq, job)).is_err() {
                    return false;
                }
                seq += 1;
                true
            };
            produce(&mut submit)
        });
        for _ in 0..workers {
            let job_rx: Receiver<(u64, J)> = job_rx.clone();
            let result_tx: Sender<(u64, Result<R, E>)> = result_tx.clone();
            let make_worker = &make_worker;
            scope.spawn(move || {
                let mut work = make_worker();
                for (seq, job) in job_rx {
                    let result = work(job);
                    let failed = result.is_err();
                    if result_tx.send((seq, result)).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(job_rx);
        drop(result_tx);

        let consumed = consume_in_order(&result_rx, &token_rx, &mut consume);
        // Closing our ends unblocks every other stage if we stopped early.
        drop(result_rx);
        drop(token_rx);
        let produced = producer.join().expect("archive producer thread panicked");
        consumed.and(produced)
    })
}

/// Recycles chunk buffers between stages. Fresh multi-megabyte allocations are returned to the
/// kernel when freed and page-faulted in again when reused, which cost more system time than
/// compressing; a small pool keeps a bounded set of warm buffers instead.
pub(crate) struct BufferPool {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
}

impl BufferPool {
    pub(crate) fn new(max_buffers: usize) -> Self {
        let (tx, rx) = bounded(max_buffers.max(1));
        BufferPool { tx, rx }
    }

    /// An empty buffer with at least `capacity` bytes reserved.
    pub(crate) fn get(&self, capacity: usize) -> Vec<u8> {
        let mut buf = self.rx.try_recv().unwrap_or_default();
        buf.clear();
        buf.reserve(capacity);
        buf
    }

    /// Returns a buffer for reuse; dropped if the pool is full.
    pub(crate) fn put(&self, buf: Vec<u8>) {
        let _ = self.tx.try_send(buf);
    }
}

fn consume_in_order<R, E>(
    results: &Receiver<(u64, Result<R, E>)>,
    tokens: &Receiver<()>,
    consume: &mut dyn FnMut(R) -> Result<(), E>,
) -> Result<(), E> {
    let mut next = 0u64;
    let mut waiting: BTreeMap<u64, R> = BTreeMap::new();
    for (seq, result) in results {
        waiting.insert(seq, result?);
        while let Some(ready) = waiting.remove(&next) {
            consume(ready)?;
            next += 1;
            let _ = tokens.recv();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn results_arrive_in_order_and_in_flight_stays_bounded() {
        let in_flight = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let mut seen = Vec::new();
        run(
            3,
            6,
            |submit| {
                for i in 0..200u64 {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    assert!(submit(i));
                }
                Ok::<(), String>(())
            },
            || {
                |i| {
                    if i % 7 == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Ok(i * 2)
                }
            },
            |r| {
                in_flight.fetch_sub(1, Ordering::SeqCst);
                seen.push(r);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..200u64).map(|i| i * 2).collect::<Vec<_>>());
        // The token is released just after consuming, so one extra may be counted.
        assert!(peak.load(Ordering::SeqCst) <= 7, "peak {peak:?}");
    }

    #[test]
    fn an_error_in_any_stage_stops_the_run() {
        let worker_err = run(
            2,
            4,
            |submit| {
                let mut i = 0u64;
                while submit(i) {
                    i += 1;
                }
                Ok(())
            },
            || {
                |i| {
                    if i == 50 {
                        Err(format!("bad job {i}"))
                    } else {
                        Ok(i)
                    }
                }
            },
            |_| Ok(()),
        );
        assert_eq!(worker_err, Err("bad job 50".to_string()));

        let consumer_err = run(
            2,
            4,
            |submit| {
                let mut i = 0u64;
                while submit(i) {
                    i += 1;
                }
                Ok(())
            },
            || Ok,
            |i| {
                if i == 10 {
                    Err("full".to_string())
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(consumer_err, Err("full".to_string()));

        let producer_err = run(
            2,
            4,
            |submit| {
                submit(1u64);
                Err("unreadable".to_string())
            },
            || Ok,
            |_| Ok(()),
        );
        assert_eq!(producer_err, Err("unreadable".to_string()));
    }
}
