//! The queue behind a topic's channel and a worker's relay: a broadcast that holds only what a
//! receiver has yet to read. It starts empty, grows with the backlog of its slowest receiver up
//! to its capacity, and gives the memory back once they have caught up. tokio's broadcast
//! allocates every slot up front (7 KiB for 128 deliveries), more than a connection costs, and
//! most topics in a one-topic-per-user deployment hold one subscriber that is never behind.
//! The API is the part of tokio's the fan-out uses, with its semantics and error types: a
//! receiver further behind than the capacity gets `Lagged` and continues from the oldest value
//! held; `Closed` once every sender is gone and nothing is left to read.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

pub use tokio::sync::broadcast::error::{RecvError, SendError, TryRecvError};

/// Slots a queue keeps allocated once it has emptied: a topic that receives steadily should not
/// allocate per delivery.
const KEPT_SLOTS: usize = 8;

/// A channel holding at most `capacity` values (at least 1), and its first receiver.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            head: 0,
            receivers: 1,
            senders: 1,
        }),
        waiting: Notify::new(),
        capacity: capacity.max(1),
    });
    let receiver = Receiver {
        shared: shared.clone(),
        next: 0,
    };
    (Sender { shared }, receiver)
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Receivers waiting for a value: every send wakes all of them (they read the same value),
    /// and so does the last sender's drop.
    waiting: Notify,
    capacity: usize,
}

struct State<T> {
    /// The values from position `head` on, each with the number of receivers yet to read it.
    /// A value leaves when the last of them has read it (or left), or when a send finds the
    /// queue full: the receivers behind it then lag.
    queue: VecDeque<(T, usize)>,
    head: u64,
    receivers: usize,
    senders: usize,
}

impl<T> State<T> {
    fn tail(&self) -> u64 {
        self.head + self.queue.len() as u64
    }

    /// Drops the values every receiver has read, and most of the room a backlog left behind.
    fn release(&mut self) {
        while let Some((_, 0)) = self.queue.front() {
            self.queue.pop_front();
            self.head += 1;
        }
        let capacity = self.queue.capacity();
        if capacity > KEPT_SLOTS && self.queue.len() * 4 <= capacity {
            self.queue.shrink_to((self.queue.len() * 2).max(KEPT_SLOTS));
        }
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // The state stays consistent at every point a panic could leave it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending half; clones send into the same queue.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// A sender that does not keep the channel open (see [`Sender::downgrade`]).
pub struct WeakSender<T> {
    shared: Arc<Shared<T>>,
}

/// A receiving half: reads every value sent after it was made, in order.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// Position of the next value to read.
    next: u64,
}

impl<T> Sender<T> {
    /// Queues `value` for every receiver there is now and wakes those waiting. Returns how many
    /// will read it; with none, the value comes back as the error. A full queue drops its
    /// oldest value first.
    pub fn send(&self, value: T) -> Result<usize, SendError<T>> {
        let mut state = self.shared.lock();
        let receivers = state.receivers;
        if receivers == 0 {
            return Err(SendError(value));
        }
        state.queue.push_back((value, receivers));
        if state.queue.len() > self.shared.capacity {
            state.queue.pop_front();
            state.head += 1;
        }
        drop(state);
        self.shared.waiting.notify_waiters();
        Ok(receivers)
    }

    /// A receiver of every value sent from now on.
    pub fn subscribe(&self) -> Receiver<T> {
        subscribe(&self.shared)
    }

    /// Values held: those some receiver has yet to read.
    pub fn len(&self) -> usize {
        self.shared.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn receiver_count(&self) -> usize {
        self.shared.lock().receivers
    }

    pub fn downgrade(&self) -> WeakSender<T> {
        WeakSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.shared.waiting.notify_waiters();
        }
    }
}

impl<T> WeakSender<T> {
    /// A sender, unless every sender is gone already.
    pub fn upgrade(&self) -> Option<Sender<T>> {
        let mut state = self.shared.lock();
        if state.senders == 0 {
            return None;
        }
        state.senders += 1;
        Some(Sender {
            shared: self.shared.clone(),
        })
    }
}

fn subscribe<T>(shared: &Arc<Shared<T>>) -> Receiver<T> {
    let mut state = shared.lock();
    state.receivers += 1;
    Receiver {
        shared: shared.clone(),
        next: state.tail(),
    }
}

impl<T: Clone> Receiver<T> {
    /// The next value; `Empty` if there is none yet.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        take(&self.shared, &mut self.next)
    }

    /// Waits for the next value. Cancel safe: a value is taken only when this returns it.
    pub async fn recv(&mut self) -> Result<T, RecvError> {
        let Receiver { shared, next } = self;
        loop {
            let notified = shared.waiting.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before looking, so a send after the look wakes this wait.
            notified.as_mut().enable();
            match take(shared, next) {
                Ok(value) => return Ok(value),
                Err(TryRecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => notified.await,
            }
        }
    }
}

impl<T> Receiver<T> {
    /// A receiver of the same channel, of every value sent from now on.
    pub fn resubscribe(&self) -> Receiver<T> {
        subscribe(&self.shared)
    }

    /// Nothing to read (a receiver that lagged has something: the `Lagged` error).
    pub fn is_empty(&self) -> bool {
        self.next == self.shared.lock().tail()
    }

    /// Values waiting for this receiver.
    pub fn len(&self) -> usize {
        (self.shared.lock().tail().saturating_sub(self.next)) as usize
    }
}

fn take<T: Clone>(shared: &Shared<T>, next: &mut u64) -> Result<T, TryRecvError> {
    let mut state = shared.lock();
    if *next < state.head {
        let missed = state.head - *next;
        *next = state.head;
        return Err(TryRecvError::Lagged(missed));
    }
    let index = (*next - state.head) as usize;
    let Some((value, unread)) = state.queue.get_mut(index) else {
        return Err(if state.senders == 0 {
            TryRecvError::Closed
        } else {
            TryRecvError::Empty
        });
    };
    let value = value.clone();
    *unread -= 1;
    *next += 1;
    if index == 0 && *unread == 0 {
        state.release();
    }
    Ok(value)
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let from = self.next.saturating_sub(state.head) as usize;
        for (_, unread) in state.queue.iter_mut().skip(from) {
            *unread -= 1;
        }
        state.receivers -= 1;
        state.release();
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Sender")
            .field("queued", &state.queue.len())
            .field("receivers", &state.receivers)
            .finish()
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("next", &self.next)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(rx: &mut Receiver<u32>) -> Vec<u32> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn held(tx: &Sender<u32>) -> (usize, usize) {
        let state = tx.shared.lock();
        (state.queue.len(), state.queue.capacity())
    }

    #[test]
    fn allocates_nothing_until_a_send_and_frees_what_everyone_read() {
        let (tx, mut a) = channel::<u32>(128);
        let mut b = tx.subscribe();
        assert_eq!(held(&tx), (0, 0), "an idle channel holds no slots");
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(all(&mut a), [1, 2]);
        assert_eq!(held(&tx).0, 2, "b has yet to read both");
        assert_eq!(b.try_recv().unwrap(), 1);
        assert_eq!(held(&tx).0, 1);
        assert_eq!(b.try_recv().unwrap(), 2);
        assert_eq!(held(&tx).0, 0);
        assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn a_backlog_grows_to_the_capacity_and_its_room_is_given_back() {
        let (tx, mut slow) = channel::<u32>(1000);
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        assert!(held(&tx).1 >= 1000);
        assert_eq!(all(&mut slow).len(), 1000);
        let (len, capacity) = held(&tx);
        assert_eq!(len, 0);
        assert!(
            capacity <= KEPT_SLOTS,
            "kept {capacity} slots after catching up"
        );
    }

    #[test]
    fn a_receiver_past_the_capacity_lags_and_goes_on_from_the_oldest_held() {
        let (tx, mut slow) = channel::<u32>(4);
        let mut fast = tx.subscribe();
        for i in 0..6 {
            tx.send(i).unwrap();
            assert_eq!(fast.try_recv().unwrap(), i);
        }
        assert_eq!(held(&tx).0, 4, "never more than the capacity");
        assert_eq!(slow.try_recv(), Err(TryRecvError::Lagged(2)));
        assert_eq!(all(&mut slow), [2, 3, 4, 5]);
        assert_eq!(held(&tx).0, 0);
    }

    #[test]
    fn receivers_read_from_when_they_joined_and_leaving_releases_their_part() {
        let (tx, first) = channel::<u32>(8);
        tx.send(1).unwrap();
        let mut second = first.resubscribe();
        assert!(second.is_empty());
        assert!(!first.is_empty());
        tx.send(2).unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(all(&mut second), [2]);
        assert_eq!(held(&tx).0, 2);
        drop(first);
        assert_eq!(
            held(&tx).0,
            0,
            "a receiver that leaves no longer holds values"
        );
        assert_eq!(tx.receiver_count(), 1);
        drop(second);
        assert!(matches!(tx.send(3), Err(SendError(3))));
    }

    #[test]
    fn closes_after_the_last_sender_once_drained() {
        let (tx, mut rx) = channel::<u32>(8);
        let weak = tx.downgrade();
        let other = weak.upgrade().expect("a sender is alive");
        other.send(1).unwrap();
        drop(other);
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(
            rx.try_recv(),
            Err(TryRecvError::Empty),
            "one sender is left"
        );
        drop(tx);
        assert!(weak.upgrade().is_none());
        assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
    }

    #[tokio::test]
    async fn recv_waits_for_a_send_and_for_the_close() {
        let (tx, mut rx) = channel::<u32>(8);
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        tx.send(7).unwrap();
        drop(tx);
        let (first, second) = waiting.await.unwrap();
        assert_eq!(first, Ok(7));
        assert_eq!(second, Err(RecvError::Closed));
    }

    #[test]
    fn a_cancelled_recv_takes_nothing() {
        use std::future::Future;
        let (tx, mut rx) = channel::<u32>(8);
        {
            let recv = rx.recv();
            let mut recv = std::pin::pin!(recv);
            let waker = futures_util::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            assert!(recv.as_mut().poll(&mut cx).is_pending());
        }
        tx.send(1).unwrap();
        assert_eq!(rx.try_recv(), Ok(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_receivers_each_read_every_value_in_order() {
        let (tx, first) = channel::<u32>(100_000);
        let receivers: Vec<_> = (0..4).map(|_| tx.subscribe()).chain([first]).collect();
        let readers: Vec<_> = receivers
            .into_iter()
            .map(|mut rx| {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Ok(v) = rx.recv().await {
                        got.push(v);
                    }
                    got
                })
            })
            .collect();
        for i in 0..20_000 {
            tx.send(i).unwrap();
            if i % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        for reader in readers {
            assert_eq!(reader.await.unwrap(), (0..20_000).collect::<Vec<_>>());
        }
    }
}
