//! A small blocking RESP2 client, over TCP or TLS: a command goes out as an array of bulk
//! strings, and a reply comes back as a `Reply`. Enough for a topology to watch its nodes and
//! for a test to poke at one; not a client library (no pipelining, no RESP3, no pub/sub).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::{Error, TlsOptions};

/// How long `command` waits to connect, and then for each read and write.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Status(String),
    /// `-ERR …`: the server refused the command (the whole line after the `-`).
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nabc`
    Bulk(Vec<u8>),
    /// `*2\r\n…`
    Array(Vec<Reply>),
    /// `$-1` or `*-1`: no value.
    Nil,
}

impl Reply {
    /// The text of a status or of a bulk string that is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Reply::Status(text) => Some(text),
            Reply::Bulk(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Reply::Integer(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Reply]> {
        match self {
            Reply::Array(items) => Some(items),
            _ => None,
        }
    }

    /// In a flat array of alternating names and values (what `SENTINEL master` returns), the
    /// value after `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.as_array()?
            .chunks_exact(2)
            .find(|pair| pair[0].as_str() == Some(name))
            .and_then(|pair| pair[1].as_str())
    }
}

/// An open connection to one server, for several commands in a row (say, `AUTH` and then what
/// it allows).
pub struct Connection {
    addr: String,
    reader: BufReader<Stream>,
}

/// What a `Connection` reads and writes: the socket, or a TLS session over it.
enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS session is a hundred times the size of a socket.
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(stream) => stream.read(buf),
            Stream::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(stream) => stream.write(buf),
            Stream::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(stream) => stream.flush(),
            Stream::Tls(stream) => stream.flush(),
        }
    }
}

impl Connection {
    /// Connects to `addr` ("127.0.0.1:6379"); `timeout` bounds the connect and then every read
    /// and write.
    pub fn open(addr: &str, timeout: Duration) -> Result<Connection, Error> {
        let stream = connect(addr, timeout)?;
        Ok(Connection {
            addr: addr.to_string(),
            reader: BufReader::new(Stream::Plain(stream)),
        })
    }

    /// Like `open`, to a server that speaks TLS only: trusting `tls.authority`'s CA, and
    /// presenting its client certificate when `tls.require_client_cert`. The handshake happens
    /// with the first command, within its timeout, and a failed one is that command's `Err`.
    pub fn open_tls(addr: &str, timeout: Duration, tls: &TlsOptions) -> Result<Connection, Error> {
        let config = client_config(tls)?;
        let stream = connect(addr, timeout)?;
        let ip = stream
            .peer_addr()
            .map_err(|cause| Error::Command {
                addr: addr.to_string(),
                command: "(connect)".into(),
                cause,
            })?
            .ip();
        // The test certificates name 127.0.0.1 (and localhost), so the address is the name.
        let session = ClientConnection::new(config, ServerName::IpAddress(ip.into()))
            .map_err(|e| Error::Tls(format!("a TLS session to {addr}: {e}")))?;
        Ok(Connection {
            addr: addr.to_string(),
            reader: BufReader::new(Stream::Tls(Box::new(StreamOwned::new(session, stream)))),
        })
    }

    /// The address it was opened to, "127.0.0.1:PORT".
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one command and reads its reply. A refusal (`-ERR …`) is `Ok(Reply::Error)`;
    /// `Err` is a failure to send or to read a well-formed reply in time.
    pub fn command(&mut self, args: &[&str]) -> Result<Reply, Error> {
        let exchange = |reader: &mut BufReader<Stream>| {
            let stream = reader.get_mut();
            stream.write_all(&encode(args))?;
            // TLS holds back what it has not sent yet.
            stream.flush()?;
            read_reply(reader)
        };
        exchange(&mut self.reader).map_err(|cause| Error::Command {
            addr: self.addr.clone(),
            // Only the command's name: its arguments may be a password (AUTH).
            command: args.first().copied().unwrap_or_default().to_uppercase(),
            cause,
        })
    }

    /// `AUTH password` (the default user), failing unless the server answers `+OK`.
    pub fn auth(&mut self, password: &str) -> Result<(), Error> {
        match self.command(&["AUTH", password])? {
            Reply::Status(ok) if ok == "OK" => Ok(()),
            other => Err(Error::Refused {
                addr: self.addr.clone(),
                command: "AUTH".into(),
                reply: format!("{other:?}"),
            }),
        }
    }
}

/// Sends one command to `addr` on a connection of its own, with `COMMAND_TIMEOUT`, and returns
/// the reply: `redis-cli -p PORT args…` without redis-cli. A refusal is `Ok(Reply::Error)`.
pub fn command(addr: &str, args: &[&str]) -> Result<Reply, Error> {
    Connection::open(addr, COMMAND_TIMEOUT)?.command(args)
}

/// A TCP connection to `addr` with `timeout` for the connect, and then for every read and
/// write.
fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, Error> {
    let failed = |cause| Error::Command {
        addr: addr.to_string(),
        command: "(connect)".into(),
        cause,
    };
    let socket: SocketAddr = addr
        .to_socket_addrs()
        .map_err(failed)?
        .next()
        .ok_or_else(|| failed(std::io::Error::new(ErrorKind::InvalidInput, "no address")))?;
    let stream = TcpStream::connect_timeout(&socket, timeout).map_err(failed)?;
    stream.set_read_timeout(Some(timeout)).map_err(failed)?;
    stream.set_write_timeout(Some(timeout)).map_err(failed)?;
    stream.set_nodelay(true).map_err(failed)?;
    Ok(stream)
}

/// A TLS client that trusts only `tls.authority`'s CA and, when the server requires one,
/// presents the authority's client certificate. The ring provider is named here rather than
/// installed for the process, so that a test's own choice is left alone.
fn client_config(tls: &TlsOptions) -> Result<Arc<ClientConfig>, Error> {
    let authority = &tls.authority;
    let unreadable =
        |path: &Path, e: &dyn std::fmt::Display| Error::Tls(format!("{}: {e}", path.display()));
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(&authority.ca).map_err(|e| unreadable(&authority.ca, &e))?
    {
        let cert = cert.map_err(|e| unreadable(&authority.ca, &e))?;
        roots.add(cert).map_err(|e| unreadable(&authority.ca, &e))?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots);
    let config = if tls.require_client_cert {
        let certs = CertificateDer::pem_file_iter(&authority.client_cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| unreadable(&authority.client_cert, &e))?;
        let key = PrivateKeyDer::from_pem_file(&authority.client_key)
            .map_err(|e| unreadable(&authority.client_key, &e))?;
        builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| unreadable(&authority.client_cert, &e))?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// A command as the server reads it: an array of bulk strings.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one whole reply. A reply that is not RESP2 is `InvalidData`; a connection closed
/// part-way is `UnexpectedEof`.
fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Reply> {
    let line = read_line(reader)?;
    let (kind, rest) = line.split_at(1);
    let length = || -> std::io::Result<i64> {
        rest.parse()
            .map_err(|_| invalid(format!("bad length in {line:?}")))
    };
    Ok(match kind {
        "+" => Reply::Status(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Integer(length()?),
        "$" => match length()? {
            -1 => Reply::Nil,
            n if n < 0 => return Err(invalid(format!("bad length in {line:?}"))),
            n => {
                let mut bytes = vec![0; n as usize + 2];
                reader.read_exact(&mut bytes)?;
                if !bytes.ends_with(b"\r\n") {
                    return Err(invalid(format!("bulk string of {n} bytes without CRLF")));
                }
                bytes.truncate(n as usize);
                Reply::Bulk(bytes)
            }
        },
        "*" => match length()? {
            -1 => Reply::Nil,
            n if n < 0 => return Err(invalid(format!("bad length in {line:?}"))),
            n => Reply::Array(
                (0..n)
                    .map(|_| read_reply(reader))
                    .collect::<Result<_, _>>()?,
            ),
        },
        _ => return Err(invalid(format!("not a RESP2 reply: {line:?}"))),
    })
}

/// One line without its CRLF, at least one character long.
fn read_line(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with(b"\r\n") || line.len() < 3 {
        return Err(invalid(format!(
            "not a RESP2 line: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| invalid("a reply line that is not UTF-8".into()))
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `input` and compares the reply, or the error's kind, with `expected`; a reply
    /// must use up the whole input.
    fn check(input: &str, expected: Result<Reply, ErrorKind>) {
        let mut reader = input.as_bytes();
        let got = read_reply(&mut reader).map_err(|e| e.kind());
        assert_eq!(got, expected, "{input:?}");
        if got.is_ok() {
            assert!(reader.is_empty(), "{input:?} left {reader:?}");
        }
    }

    fn bulk(text: &str) -> Reply {
        Reply::Bulk(text.as_bytes().to_vec())
    }

    #[test]
    fn parses_each_kind_of_reply() {
        use Reply::{Array, Integer, Nil, Status};
        check("+OK\r\n", Ok(Status("OK".into())));
        check("+\r\n", Ok(Status("".into())));
        check("\r\n", Err(ErrorKind::InvalidData));
        check(
            "-NOAUTH Authentication required.\r\n",
            Ok(Reply::Error("NOAUTH Authentication required.".into())),
        );
        check(":0\r\n", Ok(Integer(0)));
        check(":-12\r\n", Ok(Integer(-12)));
        check(":x\r\n", Err(ErrorKind::InvalidData));
        check("$3\r\nabc\r\n", Ok(bulk("abc")));
        check("$0\r\n\r\n", Ok(bulk("")));
        // A bulk string may hold CRLF: its length, not a line end, says where it stops.
        check("$4\r\na\r\nb\r\n", Ok(bulk("a\r\nb")));
        check("$-1\r\n", Ok(Nil));
        check("$-2\r\n", Err(ErrorKind::InvalidData));
        check("$3\r\nabcd\r\n", Err(ErrorKind::InvalidData));
        check("$5\r\nabc\r\n", Err(ErrorKind::UnexpectedEof));
        check("*0\r\n", Ok(Array(vec![])));
        check("*-1\r\n", Ok(Nil));
        check(
            "*3\r\n$6\r\nmaster\r\n:5\r\n*1\r\n$-1\r\n",
            Ok(Array(vec![bulk("master"), Integer(5), Array(vec![Nil])])),
        );
        check("*2\r\n:1\r\n", Err(ErrorKind::UnexpectedEof));
        check("", Err(ErrorKind::UnexpectedEof));
        check("+OK\n", Err(ErrorKind::InvalidData));
        check("PONG\r\n", Err(ErrorKind::InvalidData));
    }

    #[test]
    fn encodes_a_command_as_bulk_strings() {
        assert_eq!(
            encode(&["SET", "k", "a b"]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\na b\r\n"
        );
        assert_eq!(encode(&["X", ""]), b"*2\r\n$1\r\nX\r\n$0\r\n\r\n");
    }

    #[test]
    fn finds_a_field_in_a_flat_array() {
        let reply = Reply::Array(vec![bulk("name"), bulk("m"), bulk("num-slaves"), bulk("2")]);
        assert_eq!(reply.field("num-slaves"), Some("2"));
        assert_eq!(reply.field("flags"), None);
        assert_eq!(Reply::Nil.field("name"), None);
    }
}
