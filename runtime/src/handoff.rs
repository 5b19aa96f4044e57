//! The one place where a thread meets the event loop: a worker thread takes requests from
//! the loop in order, and hands each answer back, waking the loop after it is queued.
//!
//! ```text
//! loop ── submit(req) ──▶ requests ──▶ worker (next_request blocks)
//! loop ◀── wake ◀── answers ◀── answer(ans): push, unlock, then wake
//! ```
//!
//! The guarantees, model-checked by `loom_tests` (`--cfg loom`, see README.md "Tests"):
//! requests are served in the order submitted; every answer is taken exactly once; the wake
//! comes after its answer is visible, so a loop that takes every answer on each wake never
//! sleeps with one queued and no wake pending; the worker's `next_request` returns `None`
//! once the loop side is dropped, so the thread ends, and `submit` fails once the worker side
//! is gone (its thread ended or panicked).
//!
//! Everything goes through one mutex: the traffic is a name lookup now and then, and a
//! single lock keeps the states few enough for loom to check them all.

use std::collections::VecDeque;

use crate::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How the worker wakes the loop: a `mio::Waker` in the daemon, a loom-visible flag in the
/// model. Called after the answer is queued; a wake may be coalesced with earlier ones.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

impl Wake for mio::Waker {
    fn wake(&self) {
        // Fails only if the eventfd cannot be written, which leaves nothing to do here: the
        // answer stays queued and the loop's timeout covers the lookup.
        let _ = mio::Waker::wake(self);
    }
}

struct State<Req, Ans> {
    requests: VecDeque<Req>,
    answers: VecDeque<Ans>,
    loop_gone: bool,
    worker_gone: bool,
}

struct Shared<Req, Ans> {
    state: Mutex<State<Req, Ans>>,
    /// Signalled when a request arrives or the loop side is dropped.
    request_ready: Condvar,
}

impl<Req, Ans> Shared<Req, Ans> {
    fn lock(&self) -> MutexGuard<'_, State<Req, Ans>> {
        // A panic while holding the lock leaves the queues consistent (every change is one
        // push or pop), so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The event loop's end.
pub struct LoopSide<Req, Ans> {
    shared: Arc<Shared<Req, Ans>>,
}

/// The worker thread's end.
pub struct WorkerSide<Req, Ans, W: Wake> {
    shared: Arc<Shared<Req, Ans>>,
    wake: W,
}

/// A connected pair: give the worker side to the thread, keep the loop side.
pub fn channel<Req, Ans, W: Wake>(wake: W) -> (LoopSide<Req, Ans>, WorkerSide<Req, Ans, W>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            requests: VecDeque::new(),
            answers: VecDeque::new(),
            loop_gone: false,
            worker_gone: false,
        }),
        request_ready: Condvar::new(),
    });
    let worker = WorkerSide {
        shared: shared.clone(),
        wake,
    };
    (LoopSide { shared }, worker)
}

impl<Req, Ans> LoopSide<Req, Ans> {
    /// Queues a request for the worker; gives it back if the worker is gone.
    pub fn submit(&self, request: Req) -> Result<(), Req> {
        let mut state = self.shared.lock();
        if state.worker_gone {
            return Err(request);
        }
        state.requests.push_back(request);
        drop(state);
        self.shared.request_ready.notify_one();
        Ok(())
    }

    /// The oldest answer not yet taken. Call until `None` on every wake.
    pub fn take_answer(&self) -> Option<Ans> {
        self.shared.lock().answers.pop_front()
    }
}

impl<Req, Ans> Drop for LoopSide<Req, Ans> {
    fn drop(&mut self) {
        self.shared.lock().loop_gone = true;
        self.shared.request_ready.notify_one();
    }
}

impl<Req, Ans, W: Wake> WorkerSide<Req, Ans, W> {
    /// Blocks for the next request; `None` once the loop side is dropped.
    pub fn next_request(&self) -> Option<Req> {
        let mut state = self.shared.lock();
        loop {
            if state.loop_gone {
                return None;
            }
            if let Some(request) = state.requests.pop_front() {
                return Some(request);
            }
            state = self
                .shared
                .request_ready
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Queues an answer, then wakes the loop. `Err` if the loop side is gone.
    pub fn answer(&self, answer: Ans) -> Result<(), Ans> {
        let mut state = self.shared.lock();
        if state.loop_gone {
            return Err(answer);
        }
        state.answers.push_back(answer);
        // The wake must follow the push: a loop woken first could find an empty queue and
        // go back to sleep with this answer queued and no wake left to come.
        drop(state);
        self.wake.wake();
        Ok(())
    }
}

impl<Req, Ans, W: Wake> Drop for WorkerSide<Req, Ans, W> {
    fn drop(&mut self) {
        self.shared.lock().worker_gone = true;
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for std::sync::Arc<Count> {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_thread_answers_in_order_and_ends_with_the_loop_side() {
        let wakes = std::sync::Arc::new(Count::default());
        let (side, worker) = channel::<u32, u32, _>(wakes.clone());
        let thread = std::thread::spawn(move || {
            while let Some(n) = worker.next_request() {
                worker.answer(n * 10).unwrap();
            }
        });
        for n in 1..=3 {
            side.submit(n).unwrap();
        }
        let mut answers = Vec::new();
        while answers.len() < 3 {
            answers.extend(side.take_answer());
            std::thread::yield_now();
        }
        assert_eq!(answers, [10, 20, 30]);
        assert_eq!(side.take_answer(), None);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 3);
        drop(side);
        thread.join().unwrap();
    }

    #[test]
    fn submit_fails_once_the_worker_is_gone() {
        let (side, worker) = channel::<u32, u32, _>(std::sync::Arc::new(Count::default()));
        side.submit(1).unwrap();
        drop(worker);
        assert_eq!(side.submit(2), Err(2));
    }

    #[test]
    fn answer_fails_once_the_loop_is_gone() {
        let (side, worker) = channel::<u32, u32, _>(std::sync::Arc::new(Count::default()));
        side.submit(1).unwrap();
        drop(side);
        assert_eq!(worker.next_request(), None);
        assert_eq!(worker.answer(10), Err(10));
    }
}

/// Model checks of the hand-off: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2
/// cargo test -p ipc-gateway --release loom_tests` (README.md, "Tests").
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// The loop's waker as the model sees it: a pending flag that the loop's "poll" waits for
    /// and clears, as `epoll_wait` returns the eventfd's edge once per wake.
    #[derive(Default)]
    struct ModelWaker {
        pending: Mutex<bool>,
        woken: Condvar,
    }

    impl Wake for Arc<ModelWaker> {
        fn wake(&self) {
            *self.pending.lock().unwrap() = true;
            self.woken.notify_one();
        }
    }

    impl ModelWaker {
        /// Sleeps until a wake is pending and consumes it. A lost wakeup leaves the loop here
        /// forever with the worker blocked too, which loom reports as a deadlock.
        fn poll(&self) {
            let mut pending = self.pending.lock().unwrap();
            while !*pending {
                pending = self.woken.wait(pending).unwrap();
            }
            *pending = false;
        }
    }

    /// The resolver thread's body, as in `nats_link::Resolver::start`.
    fn spawn_worker(worker: WorkerSide<u64, u64, Arc<ModelWaker>>) -> thread::JoinHandle<u64> {
        thread::spawn(move || {
            let mut served = 0;
            while let Some(generation) = worker.next_request() {
                if worker.answer(generation).is_err() {
                    break;
                }
                served += 1;
            }
            served
        })
    }

    /// The loop asks twice (a reconnect asks for a new link while the first lookup runs),
    /// sleeps on the waker and takes every answer on each wake like `NatsLink::on_resolved`:
    /// both answers arrive once each, in order, the stale one is skipped, and the thread ends
    /// on drop.
    #[test]
    fn every_answer_arrives_once_in_order_and_wakes_the_loop() {
        loom::model(|| {
            let waker = Arc::new(ModelWaker::default());
            let (side, worker) = channel::<u64, u64, _>(waker.clone());
            let thread = spawn_worker(worker);

            side.submit(1).unwrap();
            let mut current = 1;
            let mut seen = Vec::new();
            let mut acted_on = None;
            while seen.len() < 2 {
                if current == 1 {
                    // The second request goes out while the first may be in flight.
                    current = 2;
                    side.submit(2).unwrap();
                } else {
                    waker.poll();
                }
                while let Some(generation) = side.take_answer() {
                    seen.push(generation);
                    if generation == current {
                        assert_eq!(acted_on.replace(generation), None, "acted on twice");
                    }
                }
            }
            assert_eq!(seen, [1, 2], "lost, duplicated or reordered answers");
            assert_eq!(acted_on, Some(2));
            assert_eq!(side.take_answer(), None);
            drop(side);
            assert_eq!(thread.join().unwrap(), 2);
        });
    }

    /// The loop goes away with a request queued or being served: the thread ends whichever
    /// way the drop interleaves (a missed notification would leave it blocked: a deadlock).
    #[test]
    fn the_worker_ends_when_the_loop_side_is_dropped() {
        loom::model(|| {
            let waker = Arc::new(ModelWaker::default());
            let (side, worker) = channel::<u64, u64, _>(waker);
            let thread = spawn_worker(worker);
            side.submit(1).unwrap();
            drop(side);
            assert!(thread.join().unwrap() <= 1);
        });
    }

    /// The worker thread ends on its own (a panic in it unwinds the same way): a request
    /// racing that end is either queued or refused, and once it has ended every request is
    /// refused, so the loop can give up on the lookup instead of waiting for it.
    #[test]
    fn submit_is_refused_once_the_worker_is_gone() {
        loom::model(|| {
            let waker = Arc::new(ModelWaker::default());
            let (side, worker) = channel::<u64, u64, _>(waker);
            let thread = thread::spawn(move || drop(worker));
            let _ = side.submit(1);
            thread.join().unwrap();
            assert_eq!(side.submit(2), Err(2));
        });
    }
}
