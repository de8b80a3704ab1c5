//! Concurrent requests for the same history page share one Redis call. In a resume storm the
//! clients of a lost replica arrive by the thousand, resuming the same topic from the same last
//! id; without sharing, each would take a pooled connection for the same answer.
//!
//! Sharing must not cost exactness: a caller may only use a read that Redis runs after the
//! caller's receiver started (`since`), or an event published in between would be in neither.
//! So a read is joinable until it is sent; a caller that finds it sent waits for the next round,
//! which starts when the current one ends and serves everyone who queued for it. Per key, at most
//! one read is in flight.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::watch;

pub struct SingleFlight<K, V> {
    table: Mutex<HashMap<K, Entry<V>>>,
    next_id: AtomicU64,
}

struct Entry<V> {
    current: Round<V>,
    /// Callers that came after `current` was sent; it starts when `current` ends.
    next: Option<Round<V>>,
}

struct Round<V> {
    id: u64,
    /// When the read was handed to Redis; `None` while it waits for a connection.
    sent: Option<Instant>,
    result: watch::Sender<Option<V>>,
}

impl<V> Round<V> {
    fn new(id: u64) -> Round<V> {
        Round {
            id,
            sent: None,
            result: watch::channel(None).0,
        }
    }
}

enum Turn<V> {
    Join(watch::Receiver<Option<V>>),
    /// Run the read, after the current round if one is under way.
    Lead(Option<watch::Receiver<Option<V>>>),
}

impl<K: Clone + Eq + Hash, V: Clone> SingleFlight<K, V> {
    pub fn new() -> SingleFlight<K, V> {
        SingleFlight {
            table: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// The result for `key` of `query` on what `connect` gives (or `connect`'s failure), as
    /// run after `since`: this caller's own run, or one it shares. A run counts as sent to
    /// Redis once `connect` is done.
    pub async fn run<C, Connect, ConnectFut, Query, QueryFut>(
        &self,
        key: K,
        since: Instant,
        connect: Connect,
        query: Query,
    ) -> V
    where
        Connect: Fn() -> ConnectFut,
        ConnectFut: Future<Output = Result<C, V>>,
        Query: Fn(C) -> QueryFut,
        QueryFut: Future<Output = V>,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let turn = {
            let mut table = self.lock();
            match table.get_mut(&key) {
                None => {
                    let entry = Entry {
                        current: Round::new(id),
                        next: None,
                    };
                    table.insert(key.clone(), entry);
                    Turn::Lead(None)
                }
                Some(entry) if entry.current.sent.is_none_or(|sent| sent >= since) => {
                    Turn::Join(entry.current.result.subscribe())
                }
                Some(entry) => match &entry.next {
                    Some(next) => Turn::Join(next.result.subscribe()),
                    None => {
                        entry.next = Some(Round::new(id));
                        Turn::Lead(Some(entry.current.result.subscribe()))
                    }
                },
            }
        };
        match turn {
            Turn::Join(mut result) => {
                let shared = match result.wait_for(Option::is_some).await {
                    Ok(value) => value.clone(),
                    Err(_) => None,
                };
                match shared {
                    Some(value) => value,
                    // Its leader went away (the client left) before the read ended.
                    None => attempt(&connect, &query, || {}).await,
                }
            }
            Turn::Lead(current) => {
                let lead = Lead {
                    flights: self,
                    key,
                    id,
                };
                if let Some(mut current) = current {
                    // Ended or abandoned: either way this round is the current one now.
                    let _ = current.wait_for(Option::is_some).await;
                }
                let value = attempt(&connect, &query, || lead.sent()).await;
                lead.finish(&value);
                value
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry<V>>> {
        self.table.lock().expect("single flight table poisoned")
    }

    /// Reads under way or queued (for tests).
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.lock().len()
    }
}

/// One run: connect, say it is sent, query.
async fn attempt<C, V, Connect, ConnectFut, Query, QueryFut>(
    connect: &Connect,
    query: &Query,
    sent: impl FnOnce(),
) -> V
where
    Connect: Fn() -> ConnectFut,
    ConnectFut: Future<Output = Result<C, V>>,
    Query: Fn(C) -> QueryFut,
    QueryFut: Future<Output = V>,
{
    match connect().await {
        Ok(connection) => {
            sent();
            query(connection).await
        }
        Err(failed) => failed,
    }
}

/// The caller running a round. Ending, or dropped (its client left), it takes the round out of
/// the table and starts the next one.
struct Lead<'a, K: Clone + Eq + Hash, V: Clone> {
    flights: &'a SingleFlight<K, V>,
    key: K,
    id: u64,
}

impl<K: Clone + Eq + Hash, V: Clone> Lead<'_, K, V> {
    fn sent(&self) {
        let mut table = self.flights.lock();
        if let Some(entry) = table.get_mut(&self.key) {
            if entry.current.id == self.id {
                entry.current.sent = Some(Instant::now());
            }
        }
    }

    fn finish(self, value: &V) {
        if let Some(round) = self.remove() {
            round.result.send_replace(Some(value.clone()));
        }
    }

    fn remove(&self) -> Option<Round<V>> {
        let mut table = self.flights.lock();
        let entry = table.get_mut(&self.key)?;
        if entry.current.id == self.id {
            match entry.next.take() {
                Some(next) => Some(std::mem::replace(&mut entry.current, next)),
                None => table.remove(&self.key).map(|entry| entry.current),
            }
        } else if entry.next.as_ref().is_some_and(|next| next.id == self.id) {
            // Abandoned before its turn: its joiners see the round dropped and read themselves.
            entry.next.take()
        } else {
            None
        }
    }
}

impl<K: Clone + Eq + Hash, V: Clone> Drop for Lead<'_, K, V> {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::*;

    /// A read that counts its runs, returns its run number, and is held at `gate` until the
    /// test lets it go, after saying it was sent.
    struct Reader {
        runs: AtomicUsize,
        gate: Notify,
    }

    impl Reader {
        async fn read(&self) -> usize {
            let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
            self.gate.notified().await;
            run
        }
    }

    fn setup() -> (Arc<SingleFlight<&'static str, usize>>, Arc<Reader>) {
        let reader = Reader {
            runs: AtomicUsize::new(0),
            gate: Notify::new(),
        };
        (Arc::new(SingleFlight::new()), Arc::new(reader))
    }

    fn spawn(
        flights: &Arc<SingleFlight<&'static str, usize>>,
        reader: &Arc<Reader>,
        since: Instant,
    ) -> tokio::task::JoinHandle<usize> {
        let (flights, reader) = (flights.clone(), reader.clone());
        tokio::spawn(async move {
            let connect = || async { Ok::<(), usize>(()) };
            let query = |()| {
                let reader = reader.clone();
                async move { reader.read().await }
            };
            flights.run("page", since, connect, query).await
        })
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn callers_that_started_before_the_send_share_it_and_later_ones_share_the_next() {
        let (flights, reader) = setup();
        let early = Instant::now();
        let first = spawn(&flights, &reader, early);
        settle().await;
        // Sent after `early`: joinable for a caller that started then.
        let joiner = spawn(&flights, &reader, early);
        // Started after the send: must not use it; both late callers share one next round.
        let late = Instant::now();
        let late_a = spawn(&flights, &reader, late);
        let late_b = spawn(&flights, &reader, late);
        settle().await;
        assert_eq!(
            reader.runs.load(Ordering::SeqCst),
            1,
            "one read in flight per key"
        );
        reader.gate.notify_one();
        assert_eq!((first.await.unwrap(), joiner.await.unwrap()), (1, 1));
        settle().await;
        reader.gate.notify_one();
        assert_eq!((late_a.await.unwrap(), late_b.await.unwrap()), (2, 2));
        assert_eq!(flights.keys(), 0, "nothing left in the table");
    }

    #[tokio::test]
    async fn an_abandoned_read_leaves_its_joiners_to_read_themselves() {
        let (flights, reader) = setup();
        let since = Instant::now();
        let first = spawn(&flights, &reader, since);
        settle().await;
        let joiner = spawn(&flights, &reader, since);
        settle().await;
        first.abort();
        settle().await;
        // The joiner read on its own: the second run.
        reader.gate.notify_one();
        assert_eq!(joiner.await.unwrap(), 2);
        assert_eq!(flights.keys(), 0);
    }
}
