//! The data side of training: the [`Dataset`] trait, the per-epoch order, and the
//! background loader that prepares micro-batches ahead of the compute.
//!
//! The order is a pure function of (seed, epoch): a Fisher–Yates permutation drawn
//! from a generator seeded by both.  The loader thread walks that order from a
//! [`Cursor`] and hands micro-batches over a bounded channel, in order, so the
//! lookahead overlaps loading with the compute but can never change what the trainer
//! sees.  A micro-batch that reaches the end of an epoch continues into the next one.
use crate::error::{Error, Result};
use crate::nn::Rng;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvError, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// Mixed into the seed so that the data order is independent of the model's RNG
/// stream (both start from the one run seed).
const DATA_ORDER_STREAM: u64 = 0xD1B5_4A32_D192_ED03;

/// Training examples by index.  `load` reads and preprocesses one example; it runs on
/// the loader thread, so it must be `Sync` and its items `Send`.
pub trait Dataset: Sync {
    /// One preprocessed example, ready for [`super::Trainable::accumulate`].
    type Item: Send;
    /// Number of examples (≥ 1 to train).
    fn len(&self) -> usize;
    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Example `i` (`i < len`).  A bad example is an `Err` naming its file, which
    /// stops the run.
    fn load(&self, i: usize) -> Result<Self::Item>;
    /// Example `i` for one visit of it: `draw` is a pure function of (run seed,
    /// epoch, `i`), for data sets that augment (a different view per epoch that a
    /// resumed run sees again).  The loader calls this; the default is [`Self::load`].
    fn load_augmented(&self, i: usize, draw: u64) -> Result<Self::Item> {
        let _ = draw;
        self.load(i)
    }
}

/// Mixed into the seed of [`Dataset::load_augmented`]'s draws, so that they are
/// independent of the data order's stream.
const AUGMENT_STREAM: u64 = 0x6A09_E667_F3BC_C909;

/// The `draw` of example `i`'s visit in `epoch` ([`Dataset::load_augmented`]).
pub fn visit_draw(seed: u64, epoch: u64, i: usize) -> u64 {
    use crate::rng::splitmix64;
    splitmix64(splitmix64(splitmix64(seed ^ AUGMENT_STREAM) ^ epoch) ^ i as u64)
}

/// Position in the data stream: the next example is `order(epoch)[position]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Epoch whose order [`epoch_order`] is being walked (0-based).
    pub epoch: u64,
    /// Index into that epoch's order of the next example (`0..n`).
    pub position: usize,
}

/// The permutation of `0..n` for `epoch` (Fisher–Yates from a generator seeded by
/// seed and epoch).
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = Rng::new(Rng::new(seed ^ DATA_ORDER_STREAM).next_u64() ^ epoch);
    // draw a few values first: consecutive SplitMix64 seeds start correlated
    rng.next_u64();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// One micro-batch and the cursor just past it.
pub struct MicroBatch<T> {
    /// Dataset indices, in order (for tests and logs).
    pub indices: Vec<usize>,
    /// The loaded examples ([`Dataset::load_augmented`]), one per index.
    pub items: Vec<T>,
    /// Where the stream continues after this batch.
    pub end: Cursor,
}

/// The micro-batches from `start` on, `size` examples each.  Pure bookkeeping, no
/// loading: the loader thread drives it.
struct IndexStream {
    seed: u64,
    n: usize,
    cur: Cursor,
    order: Vec<usize>,
}

impl IndexStream {
    fn new(seed: u64, n: usize, start: Cursor) -> Self {
        IndexStream {
            seed,
            n,
            cur: start,
            order: epoch_order(seed, start.epoch, n),
        }
    }
    /// The next `size` (example, epoch) pairs and the cursor past them.
    fn next_batch(&mut self, size: usize) -> (Vec<(usize, u64)>, Cursor) {
        let mut idx = Vec::with_capacity(size);
        while idx.len() < size {
            if self.cur.position >= self.n {
                self.cur = Cursor {
                    epoch: self.cur.epoch + 1,
                    position: 0,
                };
                self.order = epoch_order(self.seed, self.cur.epoch, self.n);
            }
            idx.push((self.order[self.cur.position], self.cur.epoch));
            self.cur.position += 1;
        }
        (idx, self.cur)
    }
}

/// The receiving end of [`spawn_loader`].  Dropping it stops the loader and waits until
/// its thread has ended, running rayon's pending work meanwhile when the caller is a
/// pool thread: the loader may be inside pool work of its own, which a pool thread that
/// only waited (as the end of a `std::thread::scope` does) would never run.
pub struct Loader<T> {
    rx: Option<Receiver<T>>,
    done: Arc<AtomicBool>,
}

impl<T> Loader<T> {
    /// The next message ([`recv_on_pool`]); an error once the loader has ended.
    pub fn recv(&self) -> std::result::Result<T, RecvError> {
        match &self.rx {
            Some(rx) => recv_on_pool(rx),
            None => Err(RecvError),
        }
    }
}

impl<T> Drop for Loader<T> {
    fn drop(&mut self) {
        // a loader blocked in `send` sees the closed channel and ends
        self.rx.take();
        while !self.done.load(Ordering::Acquire) {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::thread::sleep(IDLE_WAIT);
            }
        }
    }
}

/// Sets its flag when dropped: the loader thread's end, a panic included.
struct DoneOnDrop(Arc<AtomicBool>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Starts the loader on a scoped thread: micro-batches of `size` from `start`, at most
/// `ahead` waiting in the channel.  The thread stops after the first load error (sent
/// as the last message) or when the [`Loader`] is dropped.
pub fn spawn_loader<'scope, 'env, D: Dataset>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    data: &'env D,
    seed: u64,
    start: Cursor,
    size: usize,
    ahead: usize,
) -> Result<Loader<Result<MicroBatch<D::Item>>>>
where
    D::Item: 'env,
{
    let n = data.len();
    if n == 0 {
        return Err(Error::arg("train", "the training data set is empty"));
    }
    if start.position > n {
        return Err(Error::arg(
            "train",
            format!(
                "the checkpoint's data cursor (position {}) is past the data set's {n} \
                 examples: resume with the data the run started with",
                start.position
            ),
        ));
    }
    let (tx, rx) = sync_channel(ahead.max(1));
    let done = Arc::new(AtomicBool::new(false));
    let flag = DoneOnDrop(done.clone());
    scope.spawn(move || {
        let _flag = flag;
        let mut stream = IndexStream::new(seed, n, start);
        loop {
            let (visits, end) = stream.next_batch(size);
            let items: Result<Vec<D::Item>> = visits
                .iter()
                .map(|&(i, epoch)| data.load_augmented(i, visit_draw(seed, epoch, i)))
                .collect();
            let indices = visits.into_iter().map(|(i, _)| i).collect();
            let failed = items.is_err();
            let msg = items.map(|items| MicroBatch {
                indices,
                items,
                end,
            });
            if tx.send(msg).is_err() || failed {
                return;
            }
        }
    });
    Ok(Loader { rx: Some(rx), done })
}

/// How long [`recv_on_pool`] waits for a batch before it looks for pool work again.
const IDLE_WAIT: Duration = Duration::from_micros(200);

/// `rx.recv()` for a caller that may be one of rayon's pool threads (the `popen` binary
/// runs every command on one: `backend::cpu::on_worker`).  A loader's own work may use
/// the pool (a preference item's mask counts do), and a pool thread parked in `recv`
/// cannot run it: with one pool thread (`RAYON_NUM_THREADS=1`, a one-core machine) the
/// two would wait for each other forever.  So while no batch has come, the caller runs
/// the pool's pending work, and waits on the channel for at most `IDLE_WAIT` at a
/// time when there is none (a batch that comes ends the wait at once).  Off the pool it
/// is `rx.recv()`.
pub fn recv_on_pool<T>(rx: &Receiver<T>) -> std::result::Result<T, RecvError> {
    loop {
        match rx.try_recv() {
            Ok(v) => return Ok(v),
            Err(TryRecvError::Disconnected) => return Err(RecvError),
            Err(TryRecvError::Empty) => match rayon::yield_now() {
                None => return rx.recv(),
                Some(rayon::Yield::Executed) => {}
                Some(rayon::Yield::Idle) => match rx.recv_timeout(IDLE_WAIT) {
                    Ok(v) => return Ok(v),
                    Err(RecvTimeoutError::Disconnected) => return Err(RecvError),
                    Err(RecvTimeoutError::Timeout) => {}
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs `f` with a fresh one-thread pool on a thread of its own and returns what it
    /// returns; fails the test after 60 s (the deadlocks these tests catch never end).
    fn on_one_thread_pool<T: Send + 'static>(
        f: impl FnOnce(&rayon::ThreadPool) -> T + Send + 'static,
    ) -> T {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            done_tx.send(f(&pool)).ok();
        });
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the pool thread and the loader waited for each other")
    }

    /// A consumer on a one-thread pool, a producer that needs that pool: `recv` would
    /// wait forever (the stage-2 loader did so under `RAYON_NUM_THREADS=1`).
    #[test]
    fn a_pool_thread_waiting_for_a_batch_runs_the_loaders_pool_work() {
        use rayon::prelude::*;
        let got = on_one_thread_pool(|pool| {
            pool.install(|| {
                let (tx, rx) = sync_channel(1);
                std::thread::scope(|s| {
                    s.spawn(|| {
                        for k in 0..3u64 {
                            let v = pool.install(|| (0..1000u64).into_par_iter().sum::<u64>());
                            tx.send(v + k).unwrap();
                        }
                    });
                    (0..3)
                        .map(|_| recv_on_pool(&rx).unwrap())
                        .collect::<Vec<_>>()
                })
            })
        });
        assert_eq!(got, vec![499_500, 499_501, 499_502]);
        // off the pool it is a plain recv, and a closed channel is an error
        let (tx, rx) = sync_channel::<u8>(1);
        tx.send(7).unwrap();
        drop(tx);
        assert_eq!(recv_on_pool(&rx), Ok(7));
        assert!(recv_on_pool(&rx).is_err());
    }

    /// The same through [`spawn_loader`]: a data set whose loading needs the consumer's
    /// one-thread pool; two batches received, then the [`Loader`] dropped while the
    /// loader thread is in pool work or waiting to send (a run's end), and the scope
    /// still ends (it waited forever before the drop ran the pool's work).
    #[test]
    fn a_loader_on_a_one_thread_pool_delivers_and_ends() {
        struct OnPool<'p>(&'p rayon::ThreadPool);
        impl Dataset for OnPool<'_> {
            type Item = u64;
            fn len(&self) -> usize {
                5
            }
            fn load(&self, i: usize) -> Result<u64> {
                use rayon::prelude::*;
                Ok(self
                    .0
                    .install(|| (0..1000u64).into_par_iter().map(|x| x * i as u64).sum()))
            }
        }
        let items = on_one_thread_pool(|pool| {
            let data = OnPool(pool);
            pool.install(|| {
                std::thread::scope(|s| {
                    let loader = spawn_loader(s, &data, 0, Cursor::default(), 2, 1).unwrap();
                    let mut items = loader.recv().unwrap().unwrap().items;
                    items.extend(loader.recv().unwrap().unwrap().items);
                    items
                })
            })
        });
        assert_eq!(items.len(), 4);
        let mut idx: Vec<u64> = items.iter().map(|v| v / 499_500).collect();
        assert!(items.iter().all(|v| v % 499_500 == 0), "{items:?}");
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), 4, "four distinct examples: {items:?}");
    }

    #[test]
    fn order_is_a_permutation_that_changes_per_epoch_and_seed() {
        let n = 37;
        let a = epoch_order(5, 0, n);
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..n).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(5, 1, n));
        assert_ne!(a, epoch_order(6, 0, n));
        assert_eq!(a, epoch_order(5, 0, n));
    }

    /// Loads slowly and unevenly, so the lookahead fills and drains at random moments.
    struct Sleepy {
        n: usize,
    }
    impl Dataset for Sleepy {
        type Item = usize;
        fn len(&self) -> usize {
            self.n
        }
        fn load(&self, i: usize) -> Result<usize> {
            std::thread::sleep(Duration::from_micros((i as u64 * 7919) % 300));
            if i == usize::MAX {
                return Err(Error::arg("load", "unreachable"));
            }
            Ok(i * 10)
        }
    }

    fn take(ahead: usize, start: Cursor, batches: usize, size: usize) -> Vec<(Vec<usize>, Cursor)> {
        let data = Sleepy { n: 13 };
        std::thread::scope(|s| {
            let rx = spawn_loader(s, &data, 3, start, size, ahead).unwrap();
            (0..batches)
                .map(|k| {
                    if k % 3 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let b = rx.recv().unwrap().unwrap();
                    assert_eq!(
                        b.items,
                        b.indices.iter().map(|i| i * 10).collect::<Vec<_>>()
                    );
                    (b.indices, b.end)
                })
                .collect()
        })
    }

    #[test]
    fn loader_order_does_not_depend_on_lookahead_or_timing_and_resumes() {
        let a = take(1, Cursor::default(), 11, 3);
        let b = take(8, Cursor::default(), 11, 3);
        assert_eq!(a, b);
        // 11 batches of 3 = 33 items: epochs 0, 1 and 7 items of epoch 2
        assert_eq!(
            a[10].1,
            Cursor {
                epoch: 2,
                position: 7
            }
        );
        // batch 4 (items 12..15) spans the end of epoch 0
        let e0 = epoch_order(3, 0, 13);
        let e1 = epoch_order(3, 1, 13);
        assert_eq!(a[4].0, vec![e0[12], e1[0], e1[1]]);
        // restarting at a batch's end cursor continues the same stream
        let c = take(2, a[5].1, 5, 3);
        assert_eq!(&c[..], &a[6..11]);
    }

    /// Hands back each visit's draw.
    struct Draws;
    impl Dataset for Draws {
        type Item = (usize, u64);
        fn len(&self) -> usize {
            5
        }
        fn load(&self, i: usize) -> Result<(usize, u64)> {
            Ok((i, 0))
        }
        fn load_augmented(&self, i: usize, draw: u64) -> Result<(usize, u64)> {
            Ok((i, draw))
        }
    }

    #[test]
    fn each_visit_gets_the_draw_of_its_seed_epoch_and_example() {
        // 4 batches of 3 over 5 examples: epochs 0 and 1 and two of epoch 2, the second
        // batch spanning epochs 0 and 1
        let got: Vec<(usize, u64)> = std::thread::scope(|s| {
            let rx = spawn_loader(s, &Draws, 11, Cursor::default(), 3, 2).unwrap();
            (0..4)
                .flat_map(|_| rx.recv().unwrap().unwrap().items)
                .collect()
        });
        let want: Vec<(usize, u64)> = (0..3u64)
            .flat_map(|e| epoch_order(11, e, 5).into_iter().map(move |i| (i, e)))
            .take(12)
            .map(|(i, e)| (i, visit_draw(11, e, i)))
            .collect();
        assert_eq!(got, want);
        // the draws differ by example, epoch and seed
        let mut all: Vec<u64> = (0..3u64)
            .flat_map(|e| (0..5).flat_map(move |i| [visit_draw(11, e, i), visit_draw(12, e, i)]))
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 30);
    }

    #[test]
    fn empty_data_and_bad_cursor_are_errors() {
        let empty = Sleepy { n: 0 };
        let data = Sleepy { n: 4 };
        std::thread::scope(|s| {
            assert!(spawn_loader(s, &empty, 0, Cursor::default(), 2, 2).is_err());
            let far = Cursor {
                epoch: 0,
                position: 9,
            };
            let err = spawn_loader(s, &data, 0, far, 2, 2).err().unwrap();
            assert!(err.to_string().contains("position 9"), "{err}");
        });
    }
}
