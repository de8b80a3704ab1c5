//! A worker thread's sweeps: for each relay on the thread (`hub`), the caught-up streams it
//! writes to itself, one pass per delivery, instead of waking each stream's task. The common
//! deliveries (new events, keep-alives) are written from a dense list of sockets and positions,
//! so a sweep over thousands of streams touches little but the list and the kernel; anything
//! else is handed to the stream (`Sink`). Only the relay task and the streams' own tasks of
//! this thread use it, never at the same time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use super::broadcast;
use bytes::{Bytes, BytesMut};
use ssegw_protocol::{frame, StreamId};

use super::event::Delivery;
use crate::telemetry::stats::Stats;

/// A caught-up stream that its thread's relay writes to in its sweep (`handoff` implements it
/// for handed-off HTTP/1 streams). Calls come from the relay task, on the stream's own thread,
/// never while the stream's task is being polled.
pub trait Sink {
    /// A delivery the sweep does not write itself (a gap marker, the drain, a batch the stream
    /// has partly seen): the stream takes it from `position` as it would from its receiver,
    /// moves `position`, and writes what it can at once. When it cannot write it all, or must
    /// wait for a closing instant, it lets go (as [`Sink::let_go`]) and returns `stays: false`.
    fn deliver(
        &self,
        delivery: &Delivery,
        position: &mut StreamId,
        relay: &broadcast::Sender<Delivery>,
    ) -> Swept;

    /// The sweep lets go of the stream: it continues from `position` with a receiver of
    /// `relay` (which gets the relay's deliveries after the current one), writes `unwritten`
    /// first, or ends if its socket `failed`; its task is woken.
    fn let_go(
        &self,
        position: StreamId,
        unwritten: Option<Bytes>,
        failed: bool,
        relay: &broadcast::Sender<Delivery>,
    );
}

/// What a sink did with one delivery.
pub struct Swept {
    /// Events delivered (duplicates left out).
    pub events: u64,
    /// Bytes of SSE text written.
    pub bytes: usize,
    /// Still a sink for the next delivery.
    pub stays: bool,
}

/// A sink's place in its relay's sweep.
#[derive(Debug)]
pub struct SinkKey {
    relay: u64,
    key: usize,
}

/// What a sweep needs of one stream, kept together in the relay's list.
struct Entry {
    /// The stream's socket, owned by `sink`, which the entry keeps alive.
    fd: RawFd,
    /// HTTP/1.1 chunks, or (HTTP/1.0) the bare stream.
    chunked: bool,
    /// The last event written to the stream: only later ones are written, so an event that
    /// reaches the sweep twice goes out once.
    position: StreamId,
    sink: Rc<dyn Sink>,
}

/// A relay's sweep on this thread: its streams, and the round under way when a long one pauses.
#[derive(Default)]
struct Sweep {
    entries: slab::Slab<Entry>,
    /// The delivery being swept, between two steps; `None` between rounds.
    round: Option<Round>,
}

/// One delivery's pass over a sweep, in steps of at most `STREAMS_PER_STEP` streams, between
/// which the relay yields to the worker's other tasks.
struct Round {
    delivery: Delivery,
    /// `delivery` as text, when it is an event or a batch.
    run: Option<Run>,
    /// Entries with a smaller key have had the round's delivery (or joined during a pause,
    /// having had it); those from here on are still to be visited, and one that leaves before
    /// is written its part as it leaves (`remove`). A stream that joins during a pause at a key
    /// from here on is visited too, and its position skips what it had.
    next: usize,
    /// The run may still take in events that reach the relay meanwhile (`step`'s `more`).
    growing: bool,
    visited: usize,
    stats: Arc<Stats>,
}

thread_local! {
    /// This thread's sweeps, by relay id. A sweep lives while it has streams; its relay removes
    /// it when it ends.
    static SWEEPS: RefCell<HashMap<u64, Sweep>> = RefCell::new(HashMap::new());
}

/// Adds a stream at `position` to relay `relay`'s sweep on this thread. `fd` is its socket,
/// which `sink` owns.
pub fn insert(
    relay: u64,
    fd: RawFd,
    chunked: bool,
    position: StreamId,
    sink: Rc<dyn Sink>,
) -> Option<SinkKey> {
    let entry = Entry {
        fd,
        chunked,
        position,
        sink,
    };
    SWEEPS
        .try_with(|sweeps| {
            let mut sweeps = sweeps.try_borrow_mut().ok()?;
            let key = sweeps.entry(relay).or_default().entries.insert(entry);
            Some(SinkKey { relay, key })
        })
        .ok()
        .flatten()
}

/// Where a stream that left its sweep stands.
pub struct Left {
    /// The last event written to it.
    pub position: StreamId,
    /// What its socket did not take of its last write, framing included: it goes out next.
    pub unwritten: Option<Bytes>,
    /// Its socket failed: the client is gone.
    pub failed: bool,
}

/// Takes a stream out of its sweep (one the sweep did not let go of); `None` if the sweep is
/// gone. A stream that a paused round has not reached yet is written its part of the round
/// first: its task receives only what the relay sends after the round's delivery.
pub fn remove(key: SinkKey) -> Option<Left> {
    SWEEPS
        .try_with(|sweeps| {
            let mut sweeps = sweeps.try_borrow_mut().ok()?;
            let sweep = sweeps.get_mut(&key.relay)?;
            let mut entry = sweep.entries.try_remove(key.key)?;
            let mut left = Left {
                position: entry.position,
                unwritten: None,
                failed: false,
            };
            let owed = sweep.round.as_ref().filter(|round| key.key >= round.next);
            if let Some((round, run)) = owed.and_then(|round| Some((round, round.run.as_ref()?))) {
                if let Some((outcome, bytes, events)) = write_run(&mut entry, run) {
                    left.position = entry.position;
                    match outcome {
                        Ok(unwritten) => {
                            left.unwritten = unwritten;
                            record(&round.stats, events, bytes);
                        }
                        Err(_) => left.failed = true,
                    }
                }
            }
            if sweep.entries.is_empty() {
                sweeps.remove(&key.relay);
            }
            Some(left)
        })
        .ok()
        .flatten()
}

/// Starts a round: `delivery`, which the relay has sent to its receivers already, for every
/// stream of relay `relay`'s sweep on this thread, written by `step`; what the streams are
/// written is counted in `stats`.
pub fn start(relay: u64, delivery: Delivery, stats: &Arc<Stats>) {
    let _ = SWEEPS.try_with(|sweeps| {
        let Ok(mut sweeps) = sweeps.try_borrow_mut() else {
            return;
        };
        if let Some(sweep) = sweeps.get_mut(&relay) {
            let run = Run::of(&delivery);
            sweep.round = Some(Round {
                growing: run.is_some(),
                run,
                delivery,
                next: 0,
                visited: 0,
                stats: stats.clone(),
            });
        }
    });
}

/// Writes the round of relay `relay` to its next streams: all of them, or (events and
/// keep-alives, which a stream leaving meanwhile can be given or spared) `streams` of them
/// (the relay's `STREAMS_PER_STEP`). `to` is the relay's broadcast, which a stream let go of
/// receives from. Returns whether the round is over; if not, the relay yields and calls again.
///
/// With `more`, the round may grow on the way: every `GROW_EVERY` streams it takes the events
/// that reached the relay meanwhile (`more` returns them, and the relay delivers them again
/// afterwards, when the streams already past them skip them), so that the rest of the round
/// writes them in the same write. A thread that falls behind thus writes fewer, larger chunks,
/// as a stream's own task gathers what queued up while it waited.
pub fn step(
    relay: u64,
    to: &broadcast::Sender<Delivery>,
    mut more: Option<&mut dyn FnMut() -> Option<Delivery>>,
    streams: usize,
) -> bool {
    SWEEPS
        .try_with(|sweeps| {
            let Ok(mut sweeps) = sweeps.try_borrow_mut() else {
                return true;
            };
            let Some(sweep) = sweeps.get_mut(&relay) else {
                return true;
            };
            let Sweep { entries, round } = sweep;
            let Some(current) = round.as_mut() else {
                return true;
            };
            let pausable = current.run.is_some() || matches!(current.delivery, Delivery::Keepalive);
            let (mut events, mut bytes, mut taken) = (0, 0, 0usize);
            let mut key = current.next;
            while key < entries.capacity() {
                let Some(entry) = entries.get_mut(key) else {
                    key += 1;
                    continue;
                };
                // A pause only where a stream is left to write: a step that wrote the last
                // one ends the round.
                if pausable && taken == streams {
                    break;
                }
                taken += 1;
                current.visited += 1;
                if let (true, Some(run), Some(more)) =
                    (current.growing, current.run.as_mut(), more.as_mut())
                {
                    if current.visited % GROW_EVERY == 0 {
                        while let Some(next) = more() {
                            if !run.extend(&next) {
                                // Not an event that follows: it goes out after this round,
                                // and nothing after it may go out before it.
                                current.growing = false;
                                break;
                            }
                        }
                    }
                }
                let swept = match &current.run {
                    Some(run) => sweep_run(entry, run, to),
                    None => sweep_other(entry, &current.delivery, to),
                };
                events += swept.events;
                bytes += swept.bytes;
                if !swept.stays {
                    entries.remove(key);
                }
                key += 1;
            }
            current.next = key;
            record(&current.stats, events, bytes);
            let over = key >= entries.capacity();
            if over {
                *round = None;
                if entries.is_empty() {
                    sweeps.remove(&relay);
                }
            }
            over
        })
        .unwrap_or(true)
}

/// Counts what a sweep wrote: `events` events in `bytes` bytes of text.
fn record(stats: &Stats, events: u64, bytes: usize) {
    stats.record_delivered(events);
    stats.add(&stats.swept, events);
    stats.record_written(bytes);
}

/// Streams a sweep writes between two looks for events that reached the relay meanwhile.
const GROW_EVERY: usize = 256;

/// Streams a round of events writes before the relay yields: about 12 ms of `send`s here, so a
/// request or another topic on the worker waits that long, not a whole round of 10,000 streams
/// (60 ms). Smaller steps cost the hot topic itself: with 1,024 and requests arriving during
/// rounds, its p99 at 20 events/s rose by a sixth (BENCHMARKS.md).
pub const STREAMS_PER_STEP: usize = 2048;

/// The relay `relay` is ending: every stream of its sweep continues from a receiver of `to`
/// (which closes with the relay).
pub fn release(relay: u64, to: &broadcast::Sender<Delivery>) {
    let sweep = SWEEPS
        .try_with(|sweeps| sweeps.try_borrow_mut().ok()?.remove(&relay))
        .ok()
        .flatten();
    for (_, entry) in sweep.into_iter().flat_map(|sweep| sweep.entries) {
        entry.sink.let_go(entry.position, None, false, to);
    }
}

/// Consecutive events of a topic as the text a sweep writes: each stream gets the part after
/// its position.
struct Run {
    /// Every event's frame, joined.
    frames: Bytes,
    /// `frames` as one HTTP/1.1 chunk: what most streams are written, in a plain `send`.
    chunk: Bytes,
    /// Each event's id and where its frame starts in `frames`, in stream order.
    starts: Vec<(StreamId, usize)>,
}

impl Run {
    /// The run of an event or a batch; `None` for other deliveries.
    fn of(delivery: &Delivery) -> Option<Run> {
        match delivery {
            Delivery::Event(event) => Some(Run::new(event.frame.clone(), vec![(event.id, 0)])),
            Delivery::Batch(batch) => {
                let mut start = 0;
                let starts = batch
                    .events
                    .iter()
                    .map(|event| {
                        let at = (event.id, start);
                        start += event.frame.len();
                        at
                    })
                    .collect();
                Some(Run::new(batch.frames.clone(), starts))
            }
            _ => None,
        }
    }

    fn new(frames: Bytes, starts: Vec<(StreamId, usize)>) -> Run {
        let mut size_line = [0u8; 18];
        let size_line = chunk_size_line(frames.len(), &mut size_line);
        let mut chunk = BytesMut::with_capacity(size_line.len() + frames.len() + 2);
        chunk.extend_from_slice(size_line);
        chunk.extend_from_slice(&frames);
        chunk.extend_from_slice(b"\r\n");
        Run {
            frames,
            chunk: chunk.freeze(),
            starts,
        }
    }

    /// Appends the events of `delivery` if it is an event or a batch that follows the run.
    fn extend(&mut self, delivery: &Delivery) -> bool {
        let Some(next) = Run::of(delivery) else {
            return false;
        };
        let last = self.starts.last().map(|&(id, _)| id);
        if next.starts.first().map(|&(id, _)| id) <= last {
            // A new history (after a gap) or a repeat: not a continuation.
            return false;
        }
        let offset = self.frames.len();
        let mut frames = BytesMut::with_capacity(offset + next.frames.len());
        frames.extend_from_slice(&self.frames);
        frames.extend_from_slice(&next.frames);
        let mut starts = std::mem::take(&mut self.starts);
        starts.extend(next.starts.into_iter().map(|(id, at)| (id, at + offset)));
        *self = Run::new(frames.freeze(), starts);
        true
    }

    /// The text after `position`, its number of events and its last id; `None` when the
    /// stream has every event of the run.
    fn after(&self, position: StreamId) -> Option<(&[u8], u64, StreamId)> {
        let first = self.starts.partition_point(|&(id, _)| id <= position);
        let &(_, start) = self.starts.get(first)?;
        let (last, _) = self.starts[self.starts.len() - 1];
        Some((
            &self.frames[start..],
            (self.starts.len() - first) as u64,
            last,
        ))
    }
}

/// One stream, a run of events: what comes after its position, in one write.
fn sweep_run(entry: &mut Entry, run: &Run, to: &broadcast::Sender<Delivery>) -> Swept {
    match write_run(entry, run) {
        Some((outcome, bytes, events)) => swept(entry, outcome, bytes, events, to),
        None => Swept::NOTHING,
    }
}

/// Writes a stream the part of `run` after its position, if any, and moves its position past
/// it: what the socket did not take, the bytes of text and the events.
fn write_run(entry: &mut Entry, run: &Run) -> Option<(io::Result<Option<Bytes>>, usize, u64)> {
    let (text, events, last) = run.after(entry.position)?;
    entry.position = last;
    let outcome = if entry.chunked && text.len() == run.frames.len() {
        // The whole run, framed once for every stream.
        send_now(entry.fd, &run.chunk)
    } else {
        write_now(entry.fd, entry.chunked, text)
    };
    Some((outcome, text.len(), events))
}

/// One stream, any other delivery: keep-alives written here, the rest by the stream.
fn sweep_other(entry: &mut Entry, delivery: &Delivery, to: &broadcast::Sender<Delivery>) -> Swept {
    match delivery {
        Delivery::Keepalive => write_swept(entry, frame::KEEPALIVE, 0, to),
        _ => entry.sink.deliver(delivery, &mut entry.position, to),
    }
}

/// Writes `text` (holding `events` events, the entry's position already past them) to a
/// stream; lets go of the stream if its socket does not take it whole.
fn write_swept(
    entry: &mut Entry,
    text: &[u8],
    events: u64,
    to: &broadcast::Sender<Delivery>,
) -> Swept {
    let outcome = write_now(entry.fd, entry.chunked, text);
    swept(entry, outcome, text.len(), events, to)
}

/// What came of a sweep's write of `bytes` of text holding `events` events: the stream stays
/// if the socket took it whole, and is let go of otherwise.
fn swept(
    entry: &mut Entry,
    outcome: io::Result<Option<Bytes>>,
    bytes: usize,
    events: u64,
    to: &broadcast::Sender<Delivery>,
) -> Swept {
    match outcome {
        Ok(None) => Swept {
            events,
            bytes,
            stays: true,
        },
        Ok(Some(unwritten)) => {
            entry
                .sink
                .let_go(entry.position, Some(unwritten), false, to);
            Swept {
                events,
                bytes,
                stays: false,
            }
        }
        Err(_) => {
            entry.sink.let_go(entry.position, None, true, to);
            Swept {
                events: 0,
                bytes: 0,
                stays: false,
            }
        }
    }
}

impl Swept {
    const NOTHING: Swept = Swept {
        events: 0,
        bytes: 0,
        stays: true,
    };
}

/// Writes `text` to the socket `fd` as far as it takes it now, in one vectored write (an
/// HTTP/1.1 chunk if `chunked`); gives back what it did not take, framing included, which is
/// rare: the client's window is full.
pub fn write_now(fd: RawFd, chunked: bool, text: &[u8]) -> io::Result<Option<Bytes>> {
    let mut size_line = [0u8; 18];
    let parts: [&[u8]; 3] = if chunked {
        [chunk_size_line(text.len(), &mut size_line), text, b"\r\n"]
    } else {
        [&[], text, &[]]
    };
    let total: usize = parts.iter().map(|part| part.len()).sum();
    // SAFETY: `fd` is the socket of a stream that stays open while it is written to: the
    // entry holding it keeps its owner alive, and the owner's task writes only when the
    // stream is out of the sweep.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&fd);
    let slices = parts.map(IoSlice::new);
    let written = match socket.send_vectored_with_flags(&slices, libc::MSG_NOSIGNAL) {
        Ok(written) => written,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
        Err(e) => return Err(e),
    };
    if written == total {
        return Ok(None);
    }
    let mut rest = BytesMut::with_capacity(total - written);
    let mut skip = written;
    for part in parts {
        let from = skip.min(part.len());
        skip -= from;
        rest.extend_from_slice(&part[from..]);
    }
    Ok(Some(rest.freeze()))
}

/// Sends `data` (already framed) to the socket `fd` as far as it takes it now; gives back what
/// it did not take.
fn send_now(fd: RawFd, data: &Bytes) -> io::Result<Option<Bytes>> {
    // SAFETY: as in `write_now`.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let written = match socket2::SockRef::from(&fd).send_with_flags(data, libc::MSG_NOSIGNAL) {
        Ok(written) => written,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
        Err(e) => return Err(e),
    };
    Ok((written < data.len()).then(|| data.slice(written..)))
}

/// `len` in hexadecimal followed by CRLF, in `buf`: an HTTP/1.1 chunk's size line.
pub fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 16;
    let mut rest = len;
    loop {
        start -= 1;
        buf[start] = HEX[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[start..]
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::rc::Rc;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use crate::fanout::broadcast;
    use bytes::Bytes;
    use ssegw_protocol::{frame, StreamId};

    use super::{
        chunk_size_line, insert, remove, start, step, Left, Run, Sink, SinkKey, Swept, GROW_EVERY,
    };
    use crate::fanout::event::{Batch, Delivery, Event};
    use crate::telemetry::stats::Stats;

    /// A stream the sweep only writes to; it counts the times the sweep handed it anything.
    struct Client {
        handed: Cell<usize>,
    }

    impl Sink for Client {
        fn deliver(
            &self,
            _: &Delivery,
            _: &mut StreamId,
            _: &broadcast::Sender<Delivery>,
        ) -> Swept {
            self.handed.set(self.handed.get() + 1);
            Swept::NOTHING
        }

        fn let_go(&self, _: StreamId, _: Option<Bytes>, _: bool, _: &broadcast::Sender<Delivery>) {
            self.handed.set(self.handed.get() + 1);
        }
    }

    /// A stream in a sweep: the socket end the sweep writes to, the end the test reads, the
    /// sink, and its key.
    struct Stream {
        _written: UnixStream,
        read: UnixStream,
        client: Rc<Client>,
        key: Option<SinkKey>,
    }

    impl Stream {
        /// A stream at event `at` in relay `relay`'s sweep on this thread.
        fn join(relay: u64, at: u64) -> Stream {
            let (written, read) = UnixStream::pair().unwrap();
            written.set_nonblocking(true).unwrap();
            read.set_nonblocking(true).unwrap();
            let client = Rc::new(Client {
                handed: Cell::new(0),
            });
            let sink: Rc<dyn Sink> = client.clone();
            let key = insert(
                relay,
                written.as_raw_fd(),
                false,
                StreamId::new(at, 0),
                sink,
            );
            Stream {
                _written: written,
                read,
                client,
                key,
            }
        }

        /// Everything written to the stream since the last look.
        fn text(&mut self) -> String {
            let mut text = String::new();
            let _ = self.read.read_to_string(&mut text);
            text
        }

        fn leave(&mut self) -> Left {
            remove(self.key.take().unwrap()).unwrap()
        }
    }

    const EVENT_2: &str = "id: 2-0\ndata: x\n\n";

    /// The round of relay `relay` on, in steps of `streams`, until it ends; the steps taken.
    fn steps(relay: u64, to: &broadcast::Sender<Delivery>, streams: usize) -> usize {
        (1..).find(|_| step(relay, to, None, streams)).unwrap()
    }

    #[test]
    fn a_round_of_events_pauses_and_every_stream_gets_the_event_once() {
        let (to, _rx) = broadcast::channel(4);
        let stats = Arc::new(Stats::default());
        let mut streams: Vec<Stream> = (0..5).map(|_| Stream::join(1, 1)).collect();
        start(1, Delivery::Event(event(2)), &stats);
        // Two streams a step: two pauses, and nothing left after the third step.
        assert!(!step(1, &to, None, 2));
        assert_eq!(stats.swept.load(Ordering::Relaxed), 2);
        assert_eq!(steps(1, &to, 2), 2);
        assert!(step(1, &to, None, 2), "no round under way");
        for stream in &mut streams {
            assert_eq!(stream.text(), EVENT_2);
            assert_eq!(stream.client.handed.get(), 0);
        }
        assert_eq!(stats.swept.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_stream_that_leaves_a_paused_round_is_written_its_part_once() {
        let (to, _rx) = broadcast::channel(4);
        let stats = Arc::new(Stats::default());
        let mut streams: Vec<Stream> = (0..4).map(|_| Stream::join(2, 1)).collect();
        start(2, Delivery::Event(event(2)), &stats);
        assert!(!step(2, &to, None, 2));
        // One the round reached, and one it did not: the second is written as it leaves.
        let mut reached = streams.remove(0);
        let mut owed = streams.pop().unwrap();
        assert_eq!(reached.text(), EVENT_2);
        assert_eq!(owed.text(), "");
        for stream in [&mut reached, &mut owed] {
            let left = stream.leave();
            assert_eq!(
                (left.position, left.unwritten, left.failed),
                (StreamId::new(2, 0), None, false)
            );
        }
        assert_eq!(reached.text(), "");
        assert_eq!(owed.text(), EVENT_2);
        // The round goes on without them.
        assert_eq!(steps(2, &to, 2), 1);
        assert_eq!(owed.text(), "");
        for stream in &mut streams {
            assert_eq!(stream.text(), EVENT_2);
        }
        assert_eq!(stats.swept.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_stream_that_joins_a_paused_round_is_not_written_what_it_had() {
        let (to, _rx) = broadcast::channel(4);
        let stats = Arc::new(Stats::default());
        let mut streams: Vec<Stream> = (0..4).map(|_| Stream::join(3, 1)).collect();
        start(3, Delivery::Event(event(2)), &stats);
        assert!(!step(3, &to, None, 2));
        // A stream the round reached leaves, and two join having had the event (from their
        // receivers): one in the place the first left, behind the round, one after the others.
        let mut gone = streams.remove(0);
        gone.leave();
        let mut behind = Stream::join(3, 2);
        let mut ahead = Stream::join(3, 2);
        assert!(behind.key.as_ref().unwrap().key < 2);
        assert!(ahead.key.as_ref().unwrap().key >= 4);
        assert_eq!(steps(3, &to, 2), 2);
        assert_eq!(gone.text(), EVENT_2);
        for stream in &mut streams {
            assert_eq!(stream.text(), EVENT_2);
        }
        assert_eq!(
            (behind.text(), ahead.text()),
            (String::new(), String::new())
        );
        // The next event reaches all of them.
        start(3, Delivery::Event(event(3)), &stats);
        steps(3, &to, 2);
        for stream in streams.iter_mut().chain([&mut behind, &mut ahead]) {
            assert_eq!(stream.text(), "id: 3-0\ndata: x\n\n");
        }
    }

    #[test]
    fn a_round_grows_across_its_pauses_and_the_next_round_completes_the_rest() {
        // Growth is looked for every GROW_EVERY streams, so this test needs that many sockets.
        let streams_needed = GROW_EVERY + 44;
        let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
        assert!(
            limit >= 4 * streams_needed as u64,
            "open-file limit {limit}"
        );
        let (to, _rx) = broadcast::channel(4);
        let stats = Arc::new(Stats::default());
        let mut streams: Vec<Stream> = (0..streams_needed).map(|_| Stream::join(6, 1)).collect();
        start(6, Delivery::Event(event(2)), &stats);
        // Event 3 reaches the relay during the round; it is taken in at the first look, which
        // comes in the third step of 100 streams.
        let mut arrived = Some(Delivery::Event(event(3)));
        let mut more = || arrived.take();
        let mut taken = 0;
        while !step(6, &to, Some(&mut more), 100) {
            taken += 1;
        }
        assert_eq!(taken, 2);
        let (before, after) = streams.split_at_mut(GROW_EVERY - 1);
        for stream in before.iter_mut() {
            assert_eq!(stream.text(), EVENT_2);
        }
        for stream in after.iter_mut() {
            assert_eq!(stream.text(), "id: 2-0\ndata: x\n\nid: 3-0\ndata: x\n\n");
        }
        // The relay then sends event 3 on: only the streams before the growth are written.
        start(6, Delivery::Event(event(3)), &stats);
        steps(6, &to, 100);
        for (i, stream) in streams.iter_mut().enumerate() {
            let expected = if i < GROW_EVERY - 1 {
                "id: 3-0\ndata: x\n\n"
            } else {
                ""
            };
            assert_eq!(stream.text(), expected, "stream {i}");
        }
        assert_eq!(
            stats.swept.load(Ordering::Relaxed),
            2 * streams_needed as u64
        );
    }

    #[test]
    fn a_stream_whose_client_is_gone_leaves_a_paused_round_failed() {
        let (to, _rx) = broadcast::channel(4);
        let stats = Arc::new(Stats::default());
        let _first = Stream::join(4, 1);
        let mut gone = Stream::join(4, 1);
        start(4, Delivery::Event(event(2)), &stats);
        assert!(!step(4, &to, None, 1));
        // The reading end closes: the write as it leaves fails.
        let (replacement, _) = UnixStream::pair().unwrap();
        drop(std::mem::replace(&mut gone.read, replacement));
        let left = gone.leave();
        assert!(left.failed);
        assert_eq!(
            stats.swept.load(Ordering::Relaxed),
            1,
            "nothing counted for it"
        );
        assert!(step(4, &to, None, 1));
    }

    #[test]
    fn a_keepalive_round_pauses_and_a_stream_leaving_meanwhile_is_spared_it() {
        let (to, _rx) = broadcast::channel(4);
        let stats = Arc::new(Stats::default());
        let mut first = Stream::join(5, 1);
        let mut second = Stream::join(5, 1);
        start(5, Delivery::Keepalive, &stats);
        assert!(!step(5, &to, None, 1));
        let left = second.leave();
        assert_eq!((left.position, left.unwritten), (StreamId::new(1, 0), None));
        assert!(step(5, &to, None, 1));
        assert_eq!(first.text().as_bytes(), frame::KEEPALIVE);
        assert_eq!(second.text(), "");
    }

    fn event(ms: u64) -> Arc<Event> {
        Arc::new(Event::new(StreamId::new(ms, 0), None, b"x"))
    }

    fn batch(ms: &[u64]) -> Delivery {
        Delivery::Batch(Arc::new(Batch::new(ms.iter().map(|&m| event(m)).collect())))
    }

    /// What a stream at `position` is written from `run`: the text, its events, its last id.
    fn after(run: &Run, position: u64) -> Option<(String, u64, u64)> {
        run.after(StreamId::new(position, 0))
            .map(|(text, events, last)| {
                (String::from_utf8(text.to_vec()).unwrap(), events, last.ms)
            })
    }

    #[test]
    fn a_stream_is_written_the_part_of_a_run_after_its_position() {
        let run = Run::of(&batch(&[2, 3, 5])).unwrap();
        let all = "id: 2-0\ndata: x\n\nid: 3-0\ndata: x\n\nid: 5-0\ndata: x\n\n";
        assert_eq!(after(&run, 1), Some((all.to_string(), 3, 5)));
        assert_eq!(after(&run, 2), Some((all[17..].to_string(), 2, 5)));
        assert_eq!(after(&run, 4), Some((all[34..].to_string(), 1, 5)));
        assert_eq!(after(&run, 5), None);
        assert_eq!(after(&run, 9), None);
        assert!(Run::of(&Delivery::Keepalive).is_none());
        assert!(Run::of(&Delivery::Drain).is_none());
    }

    #[test]
    fn a_run_grows_only_with_events_that_follow_it() {
        let mut run = Run::of(&Delivery::Event(event(2))).unwrap();
        assert!(run.extend(&Delivery::Event(event(3))));
        assert!(run.extend(&batch(&[4, 6])));
        // A repeat, an older id (a new history after a gap) and markers end the growth.
        assert!(!run.extend(&Delivery::Event(event(6))));
        assert!(!run.extend(&Delivery::Event(event(1))));
        assert!(!run.extend(&Delivery::Keepalive));
        assert_eq!(
            after(&run, 0).map(|(_, events, last)| (events, last)),
            Some((4, 6))
        );
        let (text, events, _) = after(&run, 3).unwrap();
        assert_eq!(events, 2);
        assert_eq!(text, "id: 4-0\ndata: x\n\nid: 6-0\ndata: x\n\n");
    }

    #[test]
    fn chunk_size_lines_are_lowercase_hex_with_crlf() {
        let mut buf = [0u8; 18];
        for (len, line) in [
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (65_535, "ffff\r\n"),
            (usize::MAX, "ffffffffffffffff\r\n"),
        ] {
            assert_eq!(chunk_size_line(len, &mut buf), line.as_bytes(), "{len}");
        }
    }
}
