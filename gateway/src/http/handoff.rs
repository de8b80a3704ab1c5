//! Plain HTTP/1.1 event streams leave actix-http once their response head is written, and are
//! written straight to the socket from then on.
//!
//! actix-http's HTTP/1 dispatcher keeps an 8 KiB read buffer and an 8 KiB write buffer for the
//! life of a connection, and copies every body chunk into its write buffer to frame it. For a
//! stream that lives for hours and carries small frames, that is most of its memory and a fifth
//! of its CPU time (BENCHMARKS.md). So on a plain-TCP listener every connection's socket is
//! wrapped in a [`HandoffIo`], and the subscribe handler, instead of a streaming body, parks its
//! [`Connection`] in the connection's [`Handoff`] and answers with a head that closes the
//! connection. actix-http writes that head, flushes it and shuts the connection down: the
//! shutdown is where the socket leaves it, and the dispatcher, its buffers and the request are
//! freed. The connection's service future then writes the stream itself ([`write_stream`]):
//! each chunk in one vectored write, straight from the frames the hub shares.
//!
//! The connection stays counted by actix-server (its service future has not ended), so a
//! graceful stop still waits for it. TLS and h2c listeners keep streaming through actix.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use actix_http::body::MessageBody;
use actix_http::error::DispatchError;
use actix_http::{HttpService, Protocol, Request, Response};
use actix_service::{map_config, IntoServiceFactory, Service, ServiceFactory, ServiceFactoryExt};
use actix_web::dev::AppConfig;
use actix_web::rt::net::TcpStream;
use bytes::Bytes;
use ssegw_protocol::StreamId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::fanout::broadcast;
use crate::fanout::event::Delivery;
use crate::fanout::sse::Connection;
use crate::fanout::sweep::{self, Sink, SinkKey};
use crate::http::pipeline;

/// A connection's way out of actix-http, in the request's connection data
/// (`HttpRequest::conn_data`) on a listener that hands streams off.
#[derive(Clone, Default)]
pub struct Handoff(Rc<RefCell<Parked>>);

/// A stream parked for the socket: a native connection (which may join its relay's sweep),
/// or any other stream of chunks (the Mercure hub's).
pub enum Parkable {
    Native(Connection),
    Chunks(futures_util::stream::LocalBoxStream<'static, Bytes>),
}

#[derive(Default)]
struct Parked {
    /// The stream to write once the socket is out.
    connection: Option<Parkable>,
    /// HTTP/1.1 chunks, or (HTTP/1.0) the bare stream, ended by the close.
    chunked: bool,
    /// The socket, once actix-http shut the connection down with a stream parked.
    socket: Option<TcpStream>,
}

impl Handoff {
    /// Parks `connection` to be written on this connection's socket once actix-http lets go of
    /// it. The response must then carry no body and close the connection: see
    /// [`crate::http::api`]'s subscribe handler.
    pub fn park(&self, connection: Connection, chunked: bool) {
        self.park_any(Parkable::Native(connection), chunked);
    }

    /// Parks a stream of chunks the same way; it is written as it yields, until it ends or
    /// the client leaves.
    pub fn park_chunks(
        &self,
        chunks: futures_util::stream::LocalBoxStream<'static, Bytes>,
        chunked: bool,
    ) {
        self.park_any(Parkable::Chunks(chunks), chunked);
    }

    fn park_any(&self, stream: Parkable, chunked: bool) {
        let mut parked = self.0.borrow_mut();
        parked.connection = Some(stream);
        parked.chunked = chunked;
    }

    fn parked(&self) -> bool {
        self.0.borrow().connection.is_some()
    }

    /// The socket and its stream, if actix-http handed the socket over; otherwise the parked
    /// stream (if any) is dropped with the handoff.
    fn take(&self) -> Option<(TcpStream, Parkable, bool)> {
        let mut parked = self.0.borrow_mut();
        let socket = parked.socket.take()?;
        Some((socket, parked.connection.take()?, parked.chunked))
    }
}

/// The socket as actix-http sees it: passed through, except that shutting it down with a stream
/// parked hands it over instead.
pub struct HandoffIo {
    socket: Option<TcpStream>,
    /// Bytes read from the socket before actix-http got it (by [`pipeline`]), read first.
    unread: Bytes,
    handoff: Handoff,
}

impl HandoffIo {
    pub fn new(socket: TcpStream) -> HandoffIo {
        HandoffIo::with_unread(socket, Bytes::new())
    }

    /// The socket, with `unread` to be read before what comes from it.
    pub fn with_unread(socket: TcpStream, unread: Bytes) -> HandoffIo {
        HandoffIo {
            socket: Some(socket),
            unread,
            handoff: Handoff::default(),
        }
    }

    /// What the handler reaches through the connection data.
    pub fn handoff(&self) -> Handoff {
        self.handoff.clone()
    }

    fn socket(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match self.socket.as_mut() {
            Some(socket) => Ok(Pin::new(socket)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl AsyncRead for HandoffIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        match self.socket.as_mut() {
            Some(socket) => Pin::new(socket).poll_read(cx, buf),
            // Handed over: actix-http sees the end of the input.
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for HandoffIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.socket()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.socket()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.socket.as_mut() {
            Some(socket) => Pin::new(socket).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // actix-http shuts down only after flushing its write buffer: the head is out.
        if self.handoff.parked() {
            let socket = self.socket.take();
            self.handoff.0.borrow_mut().socket = socket;
            return Poll::Ready(Ok(()));
        }
        match self.socket.as_mut() {
            Some(socket) => Pin::new(socket).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Serves `factory`'s app on `listener`, as actix-web's `HttpServer::listen` (or, with `h2c`,
/// `listen_auto_h2c`) would, with the same timeouts; each accepted socket is passed to
/// `accepted` and then wrapped in a [`HandoffIo`]. A connection that starts with a publish is
/// served by [`pipeline`] first, with at most `pipelined` publishes in flight.
pub fn listen<A, F, I, S, B>(
    server: actix_server::ServerBuilder,
    listener: std::net::TcpListener,
    h2c: bool,
    pipelined: usize,
    accepted: A,
    factory: F,
) -> io::Result<actix_server::ServerBuilder>
where
    A: Fn(&TcpStream) + Send + Clone + 'static,
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let address = listener.local_addr()?;
    server.listen("sse-gateway", listener, move || {
        let accepted = accepted.clone();
        let app = factory()
            .into_factory()
            .map_err(|e| e.into().error_response());
        // The same app again, for the publishes of connections served by `pipeline`.
        let app_again = map_config(
            factory()
                .into_factory()
                .map_err(|e| e.into().error_response()),
            |_| AppConfig::default(),
        );
        let http = HttpService::build()
            .client_request_timeout(REQUEST_TIMEOUT)
            .client_disconnect_timeout(std::time::Duration::from_secs(1))
            // A client's FIN ends its stream instead of leaving a half-open connection behind.
            .h1_allow_half_closed(false)
            .local_addr(address)
            .on_connect_ext(|io: &HandoffIo, data| {
                data.insert(io.handoff());
            })
            // The app config only feeds `ConnectionInfo`'s fallbacks (a request without `Host`),
            // which no route reads; actix-web's own constructor for it is crate-private.
            .finish(map_config(app, |_| AppConfig::default()));
        let first = actix_service::fn_service(move |socket: TcpStream| {
            accepted(&socket);
            async move {
                let first = sniff(&socket, h2c).await?;
                Ok::<_, DispatchError>((socket, first))
            }
        });
        let connections = actix_service::fn_factory(move || {
            let (http, app) = (http.new_service(()), app_again.new_service(()));
            async move {
                let http = Rc::new(http.await?);
                let app = Rc::new(app.await.map_err(|e| {
                    tracing::error!("the app for pipelined publishing failed to start: {e:?}");
                })?);
                Ok::<_, ()>(actix_service::fn_service(
                    move |(socket, first): (TcpStream, First)| {
                        let (http, app) = (http.clone(), app.clone());
                        async move {
                            let peer = socket.peer_addr().ok();
                            let (socket, unread, protocol) = match first {
                                First::Http(protocol) => (socket, Bytes::new(), protocol),
                                // Boxed: a stream's task is not sized for it.
                                First::Publishing => {
                                    match Box::pin(pipeline::serve(socket, peer, app, pipelined))
                                        .await
                                    {
                                        pipeline::Ended::Closed => return Ok(()),
                                        pipeline::Ended::HandOver(socket, unread) => {
                                            (socket, unread, Protocol::Http1)
                                        }
                                    }
                                }
                            };
                            let io = HandoffIo::with_unread(socket, unread);
                            let handoff = io.handoff();
                            // Boxed, so that the dispatcher's state (the request's handler
                            // future included) is freed when it ends instead of sizing this
                            // connection's task for the stream's life.
                            serve(Box::pin(http.call((io, protocol, peer))), handoff).await
                        }
                    },
                ))
            }
        });
        // Boxed: actix-server's task holds the service's future twice over (the future it
        // was given and the one it awaits), which for this one is 1.2 KiB each, for the
        // connection's whole life. Boxed, the task holds a pointer, and the future once.
        actix_service::boxed::factory(first.and_then(connections))
    })
}

/// How long a client has to send its request head (actix-web's default), and on an h2c
/// listener its first bytes.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a connection is, by its first bytes.
enum First {
    /// For actix-http.
    Http(Protocol),
    /// Starts with a publish: served by [`pipeline`] first.
    Publishing,
}

/// HTTP/2 with prior knowledge (on an h2c listener), a connection that starts with a publish,
/// or HTTP/1, from the connection's first bytes (HTTP/2 as actix-http's `tcp_auto_h2c` tells
/// it, with a deadline for a client that sends nothing).
async fn sniff(socket: &TcpStream, h2c: bool) -> io::Result<First> {
    // Part of the HTTP/2 connection preface (RFC 9113, section 3.4).
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2";
    let mut first = [0u8; pipeline::PEEK];
    // A short first segment is taken as HTTP/1, as actix-http does: HTTP/2 clients send the
    // whole preface at once, and a publisher the start of its request line.
    let n = tokio::time::timeout(REQUEST_TIMEOUT, socket.peek(&mut first))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let first = &first[..n];
    Ok(if h2c && first.starts_with(H2_PREFACE) {
        First::Http(Protocol::Http2)
    } else if pipeline::starts_publishing(first) {
        First::Publishing
    } else {
        First::Http(Protocol::Http1)
    })
}

/// Serves one accepted connection: actix-http's `dispatch` (the future of its service call on
/// the connection's [`HandoffIo`]), then the stream parked in `handoff`, if one was.
async fn serve<E>(
    dispatch: Pin<Box<impl Future<Output = Result<(), E>>>>,
    handoff: Handoff,
) -> Result<(), E> {
    dispatch.await?;
    let handed_over = handoff.take();
    drop(handoff);
    match handed_over {
        Some((socket, Parkable::Native(connection), chunked)) => {
            write_stream(socket, connection, chunked).await
        }
        Some((socket, Parkable::Chunks(chunks), chunked)) => {
            write_chunks(socket, chunks, chunked).await
        }
        None => {}
    }
    Ok(())
}

/// Writes a stream of chunks to `socket` (in HTTP/1.1 chunks if `chunked`) until it ends (then
/// the last chunk, and the connection closes) or the client leaves.
async fn write_chunks(
    socket: TcpStream,
    mut chunks: futures_util::stream::LocalBoxStream<'static, Bytes>,
    chunked: bool,
) {
    use futures_util::StreamExt;
    let stream = Handed {
        socket,
        chunked,
        sink: RefCell::default(),
    };
    loop {
        match unless_left(&stream.socket, |cx| chunks.poll_next_unpin(cx)).await {
            Some(Some(chunk)) if stream.write(&chunk).await.is_err() => return,
            Some(Some(_)) => {}
            Some(None) => return stream.finish().await,
            None => return,
        }
    }
}

/// Writes `connection`'s stream to `socket`, in HTTP/1.1 chunks if `chunked`, until it ends
/// (then the last chunk, and the connection closes) or the client leaves (its FIN or an error).
/// While the stream is caught up, its thread's relay writes to it in its sweep ([`Sink`]) and
/// this task only waits for the client to leave, the closing instant, or the relay to hand the
/// stream back.
async fn write_stream(socket: TcpStream, connection: Connection, chunked: bool) {
    let stream = Rc::new(Handed {
        socket,
        chunked,
        sink: RefCell::default(),
    });
    let mut connection = connection;
    loop {
        if connection.may_sweep() {
            match stream.swept(connection).await {
                Swept::Refused(back) => connection = back,
                Swept::Back(back) => {
                    connection = back;
                    // What the sweep could not write goes out first.
                    let unwritten = stream.sink.borrow_mut().unwritten.take();
                    if let Some(rest) = unwritten {
                        let rest = &mut [IoSlice::new(&rest)];
                        if write_all(&stream.socket, rest).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Swept::ClientLeft => return,
            }
        }
        let next = {
            let chunk = connection.next_chunk();
            futures_util::pin_mut!(chunk);
            match unless_left(&stream.socket, |cx| chunk.as_mut().poll(cx)).await {
                Some(next) => next,
                None => return,
            }
        };
        match next {
            Some(chunk) => {
                if stream.write(&chunk).await.is_err() {
                    return;
                }
            }
            None => return stream.finish().await,
        }
    }
}

/// What `poll_next` yields, or `None` once the client left (its FIN or an error; bytes it
/// sends after its request are ignored). Waits on the socket's own read-readiness slot, not a
/// `readable()` future: that one would join and leave the socket's waiter list on every
/// delivery.
async fn unless_left<T>(
    socket: &TcpStream,
    mut poll_next: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> Option<T> {
    loop {
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(next) = poll_next(cx) {
                return Poll::Ready(Some(next));
            }
            match socket.poll_read_ready(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match next {
            Some(next) => return Some(next),
            None if client_left(socket) => return None,
            None => {}
        }
    }
}

/// A handed-off stream: its socket, shared by its task and (while it is swept) its relay.
struct Handed {
    socket: TcpStream,
    /// HTTP/1.1 chunks, or (HTTP/1.0) the bare stream.
    chunked: bool,
    sink: RefCell<SinkState>,
}

/// A handed-off stream's side of the sweep. Borrowed only briefly, never across an await:
/// by the relay in [`Sink`]'s calls, by the task when it wakes.
#[derive(Default)]
struct SinkState {
    /// The connection while the stream is swept; the task holds it otherwise.
    connection: Option<Connection>,
    /// What the sweep could not write at once, framing included; the task writes it next.
    unwritten: Option<Bytes>,
    /// The sweep let go of the stream: its connection has its position and a receiver of the
    /// relay again.
    released: bool,
    /// A write of the sweep failed: the client is gone.
    failed: bool,
    /// The task, waiting while the stream is swept.
    waker: Option<Waker>,
}

impl Handed {
    /// Puts the stream in its relay's sweep, if the relay takes it, and waits until it is out
    /// again.
    async fn swept(self: &Rc<Self>, mut connection: Connection) -> Swept {
        let position = connection.position();
        let fd = self.socket.as_raw_fd();
        let sink: Rc<dyn Sink> = self.clone();
        let Some(key) = connection
            .membership()
            .sweep_into(fd, self.chunked, position, sink)
        else {
            return Swept::Refused(connection);
        };
        *self.sink.borrow_mut() = SinkState {
            connection: Some(connection),
            ..SinkState::default()
        };
        let mut sweeping = Sweeping {
            stream: self,
            key: Some(key),
        };
        let client_left = std::future::poll_fn(|cx| {
            let mut state = self.sink.borrow_mut();
            if state.released {
                return Poll::Ready(state.failed);
            }
            let closing = state
                .connection
                .as_mut()
                .is_some_and(|connection| connection.poll_closing(cx).is_ready());
            if closing {
                return Poll::Ready(false);
            }
            if !state
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.waker = Some(cx.waker().clone());
            }
            drop(state);
            loop {
                match self.socket.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) if !client_left(&self.socket) => continue,
                    Poll::Ready(_) => return Poll::Ready(true),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        match (sweeping.end(), client_left) {
            (Some(connection), false) => Swept::Back(connection),
            _ => Swept::ClientLeft,
        }
    }

    /// Ends the stream: the last chunk (HTTP/1.1), then the write side of the connection.
    async fn finish(&self) {
        if self.chunked {
            let _ = write_all(&self.socket, &mut [IoSlice::new(LAST_CHUNK)]).await;
        }
        let _ = socket2::SockRef::from(&self.socket).shutdown(std::net::Shutdown::Write);
    }

    /// Writes one chunk, waiting for the socket as long as it takes.
    async fn write(&self, data: &Bytes) -> io::Result<()> {
        if !self.chunked {
            return write_all(&self.socket, &mut [IoSlice::new(data)]).await;
        }
        if data.is_empty() {
            // An empty chunk would end the body.
            return Ok(());
        }
        let mut size_line = [0u8; 18];
        let size_line = sweep::chunk_size_line(data.len(), &mut size_line);
        write_all(
            &self.socket,
            &mut [
                IoSlice::new(size_line),
                IoSlice::new(data),
                IoSlice::new(b"\r\n"),
            ],
        )
        .await
    }
}

impl Sink for Handed {
    fn deliver(
        &self,
        delivery: &Delivery,
        position: &mut StreamId,
        relay: &broadcast::Sender<Delivery>,
    ) -> sweep::Swept {
        let mut state = self.sink.borrow_mut();
        let Some(connection) = state.connection.as_mut() else {
            // Only a stream whose task is taking it out of the sweep: let go of it.
            return sweep::Swept {
                events: 0,
                bytes: 0,
                stays: false,
            };
        };
        connection.resume_at(*position);
        let taken = connection.take_swept(delivery);
        *position = connection.position();
        drop(state);
        let (mut unwritten, mut failed, mut bytes) = (None, false, 0);
        if let Some(chunk) = taken.chunk {
            bytes = chunk.len();
            match sweep::write_now(self.socket.as_raw_fd(), self.chunked, &chunk) {
                Ok(rest) => unwritten = rest,
                Err(_) => failed = true,
            }
        }
        let stays = !taken.leave && unwritten.is_none() && !failed;
        if !stays {
            self.let_go(*position, unwritten, failed, relay);
        }
        sweep::Swept {
            events: taken.events,
            bytes,
            stays,
        }
    }

    fn let_go(
        &self,
        position: StreamId,
        unwritten: Option<Bytes>,
        failed: bool,
        relay: &broadcast::Sender<Delivery>,
    ) {
        let mut state = self.sink.borrow_mut();
        if let Some(connection) = state.connection.as_mut() {
            connection.resume_at(position);
            connection.membership().rejoin(relay.subscribe());
        }
        state.unwritten = unwritten;
        state.failed = failed;
        state.released = true;
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }
}

/// How a stream's time in the sweep ended.
enum Swept {
    /// No relay of this thread serves the topic: the task writes the stream itself.
    Refused(Connection),
    /// The sweep let go of the stream, or its closing instant came.
    Back(Connection),
    /// The client left, or a write of the sweep failed.
    ClientLeft,
}

/// A stream's time in the sweep. Ending it (also when the task is dropped meanwhile) takes the
/// stream out of the sweep, unless the sweep let go of it already, and gives its connection
/// back at the position the sweep reached (with what its socket did not take of the sweep's
/// last write in `SinkState::unwritten`), or nothing if that write failed.
struct Sweeping<'a> {
    stream: &'a Handed,
    key: Option<SinkKey>,
}

impl Sweeping<'_> {
    fn end(&mut self) -> Option<Connection> {
        let key = self.key.take()?;
        let mut state = self.stream.sink.borrow_mut();
        let mut connection = state.connection.take()?;
        if !state.released {
            if let Some(left) = connection.membership().leave_sweep(key) {
                if left.failed {
                    return None;
                }
                connection.resume_at(left.position);
                state.unwritten = left.unwritten;
            }
        }
        Some(connection)
    }
}

impl Drop for Sweeping<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

/// The chunk that ends a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Reads what is readable: the end of input (the client's FIN) or an error means the client
/// left; bytes it sends after its request are ignored.
fn client_left(socket: &TcpStream) -> bool {
    let mut scratch = [0u8; 256];
    loop {
        match socket.try_read(&mut scratch) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Writes all of `slices`, in vectored writes, waiting for the socket when it is full.
async fn write_all(socket: &TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match socket.try_write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut slices, written),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::write_stream;
    use crate::fanout::sse::tests::idle_connection;

    /// A handed-off connection's task holds this future for the stream's whole life: it must
    /// stay the size of the stream's state, not of actix-http's dispatcher. Measured figures:
    /// BENCHMARKS.md.
    #[tokio::test]
    async fn a_handed_off_stream_holds_little_state() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (_client, (socket, _)) = (client.unwrap(), accepted.unwrap());
        let stream = write_stream(socket, idle_connection(), true);
        let size = std::mem::size_of_val(&stream);
        assert!(size <= 1024, "a handed-off stream's future is {size} bytes");
    }
}
