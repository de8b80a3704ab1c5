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

use bytes::{Bytes, BytesMut};
use ssegw_protocol::{frame, StreamId};
use tokio::sync::broadcast;

use crate::hub::Delivery;
use crate::stats::Stats;

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

thread_local! {
    /// This thread's sweeps, by relay id. An entry lives while it has sinks; its relay removes
    /// it when it ends.
    static SWEEPS: RefCell<HashMap<u64, slab::Slab<Entry>>> = RefCell::new(HashMap::new());
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
            let key = sweeps.entry(relay).or_default().insert(entry);
            Some(SinkKey { relay, key })
        })
        .ok()
        .flatten()
}

/// Takes a stream out of its sweep (one the sweep did not let go of); returns the position it
/// reached, `None` if the sweep is gone.
pub fn remove(key: SinkKey) -> Option<StreamId> {
    SWEEPS
        .try_with(|sweeps| {
            let mut sweeps = sweeps.try_borrow_mut().ok()?;
            let entries = sweeps.get_mut(&key.relay)?;
            let entry = entries.try_remove(key.key)?;
            if entries.is_empty() {
                sweeps.remove(&key.relay);
            }
            Some(entry.position)
        })
        .ok()
        .flatten()
}

/// Hands `delivery` to every stream of relay `relay`'s sweep, and counts what they were
/// written. `to` is the relay's broadcast, already sent `delivery`.
///
/// With `more`, the sweep may grow on the way: every `GROW_EVERY` streams it takes the events
/// that reached the relay meanwhile (`more` returns them, and the relay delivers them again
/// afterwards, when the streams already past them skip them), so that the rest of the sweep
/// writes them in the same write. A thread that falls behind thus writes fewer, larger chunks,
/// as a stream's own task gathers what queued up while it waited.
pub fn serve(
    relay: u64,
    delivery: &Delivery,
    to: &broadcast::Sender<Delivery>,
    stats: &Stats,
    mut more: Option<&mut dyn FnMut() -> Option<Delivery>>,
) {
    let _ = SWEEPS.try_with(|sweeps| {
        let Ok(mut sweeps) = sweeps.try_borrow_mut() else {
            return;
        };
        let Some(entries) = sweeps.get_mut(&relay) else {
            return;
        };
        let mut run = Run::of(delivery);
        let mut growing = run.is_some() && more.is_some();
        let (mut events, mut bytes, mut visited) = (0, 0, 0usize);
        entries.retain(|_, entry| {
            visited += 1;
            if let (true, Some(run), Some(more)) = (growing, run.as_mut(), more.as_mut()) {
                if visited % GROW_EVERY == 0 {
                    while let Some(next) = more() {
                        if !run.extend(&next) {
                            // Not an event that follows: it goes out after this sweep, and
                            // nothing after it may go out before it.
                            growing = false;
                            break;
                        }
                    }
                }
            }
            let swept = match &run {
                Some(run) => sweep_run(entry, run, to),
                None => sweep_other(entry, delivery, to),
            };
            events += swept.events;
            bytes += swept.bytes;
            swept.stays
        });
        if entries.is_empty() {
            sweeps.remove(&relay);
        }
        stats.record_delivered(events);
        stats.add(&stats.swept, events);
        stats.record_written(bytes);
    });
}

/// Streams a sweep writes between two looks for events that reached the relay meanwhile.
const GROW_EVERY: usize = 256;

/// The relay `relay` is ending: every stream of its sweep continues from a receiver of `to`
/// (which closes with the relay).
pub fn release(relay: u64, to: &broadcast::Sender<Delivery>) {
    let entries = SWEEPS
        .try_with(|sweeps| sweeps.try_borrow_mut().ok()?.remove(&relay))
        .ok()
        .flatten();
    for (_, entry) in entries.into_iter().flatten() {
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
    let Some((text, events, last)) = run.after(entry.position) else {
        return Swept::NOTHING;
    };
    entry.position = last;
    if entry.chunked && text.len() == run.frames.len() {
        // The whole run, framed once for every stream.
        let outcome = send_now(entry.fd, &run.chunk);
        return swept(entry, outcome, text.len(), events, to);
    }
    write_swept(entry, text, events, to)
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
    use std::sync::Arc;

    use ssegw_protocol::StreamId;

    use super::{chunk_size_line, Run};
    use crate::hub::{Batch, Delivery, Event};

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
