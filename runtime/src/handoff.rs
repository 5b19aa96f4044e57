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
//! comes after its answer is visible, so a loop that drains the answers on each wake never
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
        // The wake must follow the push: a loop woken first could drain an empty queue and
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
