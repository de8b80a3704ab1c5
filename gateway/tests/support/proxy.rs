//! A TCP proxy for fault tests: sits between a gateway replica and Redis and can cut,
//! blackhole or delay that link. All its work runs on its own std threads, so tests may drive
//! it from inside an async runtime. It forwards bytes untouched and never parses them.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How much one read takes off a socket.
const CHUNK: usize = 16 * 1024;
/// Chunks read but not yet written, per direction of a connection (so at most 1 MiB).
const QUEUED_CHUNKS: usize = 64;
/// Upstream is a local `redis-server`: it answers or refuses at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A proxy listening on `addr` and forwarding every connection to one upstream address.
///
/// Each connection runs four threads: per direction, a reader that stamps every chunk with
/// the time it arrived and queues it, and a writer that delivers it once the link allows.
/// Splitting reading from writing lets `delay` model latency (every chunk arrives
/// `latency` after it was sent) instead of throttling throughput, and lets `blackhole` hold
/// bytes without losing them.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free 127.0.0.1 port and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: no free port");
        let addr = listener.local_addr().expect("proxy: listener address");
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State {
                mode: Mode::Forward,
                latency: Duration::ZERO,
                stopping: false,
                next_id: 0,
                connections: HashMap::new(),
            }),
            changed: Condvar::new(),
        });
        let acceptor = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || shared.accept_loop(listener))
                .expect("proxy: spawn acceptor")
        };
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `redis://<addr>`, for pointing a gateway at Redis through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Network cut: shuts down every open connection at once (both directions, so both peers
    /// see the close) and, until `restore`, closes new connections right after accepting them.
    pub fn cut(&self) {
        let mut state = self.shared.lock();
        state.mode = Mode::Cut;
        state.close_all();
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Partition without a close: stops forwarding in both directions on open and new
    /// connections. Nothing is closed; the peers see silence while their writes are held
    /// (first in the proxy's queues, then in the kernel's buffers). On `restore` the held
    /// bytes are delivered in order and the connections carry on.
    pub fn blackhole(&self) {
        self.shared.set(|state| state.mode = Mode::Blackhole);
    }

    /// Adds `latency` to every forwarded chunk in both directions (`Duration::ZERO` = none).
    /// Independent of the mode: held bytes keep their latency once a blackhole lifts.
    pub fn delay(&self, latency: Duration) {
        self.shared.set(|state| state.latency = latency);
    }

    /// Back to plain forwarding: no cut, no blackhole, no latency.
    pub fn restore(&self) {
        self.shared.set(|state| {
            state.mode = Mode::Forward;
            state.latency = Duration::ZERO;
        });
    }

    /// Connections currently open through the proxy. A cut one stops counting at once; one
    /// its peers close stops counting when both directions have finished.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().connections.len()
    }
}

impl Drop for Proxy {
    /// Closes every connection and stops the acceptor. Connection threads are left to end on
    /// their own (their sockets are shut down, so none blocks for long).
    fn drop(&mut self) {
        self.shared.set(|state| {
            state.stopping = true;
            state.close_all();
        });
        if let Some(acceptor) = self.acceptor.take() {
            // The acceptor blocks in `accept`; a connection wakes it to see `stopping`. If
            // even that fails, leave the thread detached rather than hang the test.
            if TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT).is_ok() {
                let _ = acceptor.join();
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Forward,
    Blackhole,
    Cut,
}

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    /// Notified on every change of `State`, so that writers holding a chunk (blackhole) or
    /// waiting out its latency re-check whether to deliver it, wait longer or drop it.
    changed: Condvar,
}

struct State {
    mode: Mode,
    latency: Duration,
    /// Set once by `Drop`: the acceptor exits and writers drop what they hold.
    stopping: bool,
    next_id: u64,
    /// Clones of both sockets of every open connection, so that `cut` can shut them down
    /// while the connection's own threads are blocked reading or writing them.
    connections: HashMap<u64, [TcpStream; 2]>,
}

impl State {
    fn close_all(&mut self) {
        for (_, sockets) in self.connections.drain() {
            shut_down(&sockets);
        }
    }
}

fn shut_down(sockets: &[TcpStream; 2]) {
    for socket in sockets {
        let _ = socket.shutdown(Shutdown::Both);
    }
}

/// What a reader hands its writer.
struct Segment {
    arrived: Instant,
    /// `None` is the peer's end of stream, passed on as a half-close.
    bytes: Option<Vec<u8>>,
}

impl Shared {
    /// Poisoning cannot leave `State` inconsistent (every update is a plain assignment), and
    /// a panicking pump must not take the others down with it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, update: impl FnOnce(&mut State)) {
        update(&mut self.lock());
        self.changed.notify_all();
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for client in listener.incoming() {
            if self.lock().stopping {
                return;
            }
            match client {
                Ok(client) => self.admit(client),
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Connects `client` to the upstream and starts its four threads, unless the link is cut
    /// (then dropping `client` closes it).
    fn admit(self: &Arc<Self>, client: TcpStream) {
        if self.lock().mode == Mode::Cut {
            return;
        }
        let Ok(upstream) = TcpStream::connect_timeout(&self.upstream, CONNECT_TIMEOUT) else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let handles = (|| {
            Some((
                [client.try_clone().ok()?, upstream.try_clone().ok()?],
                client.try_clone().ok()?,
                upstream.try_clone().ok()?,
            ))
        })();
        let Some((registered, client_writer, upstream_reader)) = handles else {
            return;
        };

        // Re-check under the lock: a `cut` or `Drop` since the first check must not miss it.
        let id = {
            let mut state = self.lock();
            if state.mode == Mode::Cut || state.stopping {
                return;
            }
            let id = state.next_id;
            state.next_id += 1;
            state.connections.insert(id, registered);
            id
        };
        let connection = Arc::new(Connection {
            id,
            shared: self.clone(),
        });
        let (to_upstream, from_client) = mpsc::sync_channel(QUEUED_CHUNKS);
        let (to_client, from_upstream) = mpsc::sync_channel(QUEUED_CHUNKS);
        let spawned = spawn_pump("proxy-read-client", {
            let connection = connection.clone();
            move || connection.read_side(client, to_upstream)
        }) && spawn_pump("proxy-write-upstream", {
            let connection = connection.clone();
            move || connection.write_side(upstream, from_client)
        }) && spawn_pump("proxy-read-upstream", {
            let connection = connection.clone();
            move || connection.read_side(upstream_reader, to_client)
        }) && spawn_pump("proxy-write-client", {
            let connection = connection.clone();
            move || connection.write_side(client_writer, from_upstream)
        });
        if !spawned {
            // The pumps already running end once their sockets are shut down.
            connection.close();
        }
    }

    /// Blocks until a chunk that arrived at `arrived` may be written: the link is not
    /// blackholed and the chunk's latency has passed. False when the link is cut or the proxy
    /// stops: the chunk is dropped and its connection ends.
    fn wait_deliverable(&self, arrived: Instant) -> bool {
        let mut state = self.lock();
        loop {
            if state.stopping || state.mode == Mode::Cut {
                return false;
            }
            if state.mode == Mode::Forward {
                let due = arrived + state.latency;
                let now = Instant::now();
                if now >= due {
                    return true;
                }
                state = self
                    .changed
                    .wait_timeout(state, due - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            } else {
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}

/// Starts one pump thread; false if the system has no thread to give.
fn spawn_pump(name: &str, pump: impl FnOnce() + Send + 'static) -> bool {
    thread::Builder::new().name(name.into()).spawn(pump).is_ok()
}

/// One proxied connection, shared by its four threads; leaves the registry when the last
/// of them ends.
struct Connection {
    id: u64,
    shared: Arc<Shared>,
}

impl Connection {
    /// Ends the connection abruptly: both sockets shut down in both directions.
    fn close(&self) {
        if let Some(sockets) = self.shared.lock().connections.get(&self.id) {
            shut_down(sockets);
        }
    }

    /// Reads `from` and queues what arrives for the writer of the same direction. A full
    /// queue blocks the reader, which pushes back on the sender through TCP.
    fn read_side(self: Arc<Self>, mut from: TcpStream, queue: SyncSender<Segment>) {
        let mut buf = vec![0; CHUNK];
        loop {
            let bytes = match from.read(&mut buf) {
                Ok(0) => None,
                Ok(n) => Some(buf[..n].to_vec()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close(),
            };
            let end = bytes.is_none();
            let segment = Segment {
                arrived: Instant::now(),
                bytes,
            };
            // A send fails only once the writer has gone, after closing the connection.
            if queue.send(segment).is_err() || end {
                return;
            }
        }
    }

    /// Writes queued chunks to `to`, in order, each once the link lets it through.
    fn write_side(self: Arc<Self>, mut to: TcpStream, queue: Receiver<Segment>) {
        // The queue ends without an end of stream only after the reader closed the connection.
        for segment in queue {
            if !self.shared.wait_deliverable(segment.arrived) {
                return;
            }
            match segment.bytes {
                Some(bytes) => {
                    if to.write_all(&bytes).is_err() {
                        return self.close();
                    }
                }
                None => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.lock().connections.remove(&self.id);
    }
}
