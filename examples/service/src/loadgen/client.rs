//! A minimal HTTP/1.1 client over one keep-alive TCP connection: enough for the service's
//! JSON routes (`Content-Length` or chunked bodies), without a TLS stack.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Bodies larger than this are refused (the service's are a few kilobytes at most, except
/// `/metrics`).
const MAX_BODY: usize = 64 << 20;

/// One connection, reopened after an error.
pub struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    request: Vec<u8>,
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (dechunked).
    pub body: Vec<u8>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    /// A client of `addr` (connected on first use).
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            conn: None,
            request: Vec::with_capacity(256),
        }
    }

    /// Sends one request; on a connection that turns out to be closed (the server dropped
    /// an idle keep-alive connection), reconnects and sends it once more.
    ///
    /// # Errors
    /// Connecting, writing or reading failed, or the response is not HTTP/1.1 we can read.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        json: Option<&[u8]>,
    ) -> io::Result<Response> {
        let reused = self.conn.is_some();
        match self.try_send(method, path, json).await {
            Ok(r) => Ok(r),
            Err(e) if reused && is_closed(&e) => {
                self.conn = None;
                self.try_send(method, path, json).await
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    async fn try_send(
        &mut self,
        method: &str,
        path: &str,
        json: Option<&[u8]>,
    ) -> io::Result<Response> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().expect("connected above");
        self.request.clear();
        self.request.extend_from_slice(
            format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr).as_bytes(),
        );
        if let Some(body) = json {
            self.request.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    body.len()
                )
                .as_bytes(),
            );
        }
        self.request.extend_from_slice(b"\r\n");
        if let Some(body) = json {
            self.request.extend_from_slice(body);
        }
        conn.get_mut().write_all(&self.request).await?;
        let response = read_response(conn).await;
        if response.is_err() {
            self.conn = None;
        }
        response
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

async fn read_line(conn: &mut BufReader<TcpStream>, line: &mut String) -> io::Result<()> {
    line.clear();
    if conn.read_line(line).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn read_response(conn: &mut BufReader<TcpStream>) -> io::Result<Response> {
    let mut line = String::new();
    read_line(conn, &mut line).await?;
    let status = line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| {
            bad(format!(
                "not an HTTP/1.1 status line: {:?}",
                line.trim_end()
            ))
        })?;
    let mut length = None;
    let mut chunked = false;
    loop {
        read_line(conn, &mut line).await?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad(format!("malformed header {header:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| bad(format!("bad Content-Length {value:?}")))?;
            if n > MAX_BODY {
                return Err(bad(format!("body of {n} bytes is too large")));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            read_line(conn, &mut line).await?;
            let size = line.trim_end().split(';').next().unwrap_or("");
            let n = usize::from_str_radix(size, 16)
                .map_err(|_| bad(format!("bad chunk size {size:?}")))?;
            if n > MAX_BODY - body.len() {
                return Err(bad("chunked body too large"));
            }
            if n == 0 {
                // Trailers, then the empty line.
                loop {
                    read_line(conn, &mut line).await?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + n, 0);
            conn.read_exact(&mut body[start..]).await?;
            read_line(conn, &mut line).await?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        conn.read_exact(&mut body).await?;
    } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
        return Err(bad("a response without Content-Length or chunked encoding"));
    }
    Ok(Response { status, body })
}
