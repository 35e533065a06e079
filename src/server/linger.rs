//! Lingering close: a client connection is closed the way nginx closes one (its
//! `lingering_close`), so that a client still sending a body gets the answer it was sent.
//!
//! When tollgate answers before reading a whole request body — a 413 for an over-long
//! `content-length`, a 400 for a bad multipart form found while looking for its `model` — hyper
//! gives up on the rest of the body and closes the connection. Closing a socket with unread
//! data makes the kernel send a reset instead of a FIN, and the client, still writing, then
//! sees "broken pipe" or "connection reset" instead of the error it was answered with (and may
//! lose that answer from its receive buffer). So on close, [`Lingering`] first sends its FIN
//! (after everything written), then reads and discards what the client still sends until the
//! client closes too, goes quiet for 2 s, or 10 s have passed ([`BOUNDS`]).
//!
//! A connection whose client closed first (its read side saw the end) closes at once: nothing
//! more can arrive, so there is nothing to wait for.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// How long a closing connection waits for its client.
pub struct Bounds {
    /// How long the client may stay silent before the connection is closed anyway.
    pub quiet_for: Duration,
    /// The longest a closing connection keeps reading, however steadily the client sends.
    pub at_most: Duration,
}

/// The bounds every client connection closes with (nginx's defaults are 5 s and 30 s).
pub static BOUNDS: Bounds = Bounds {
    quiet_for: Duration::from_secs(2),
    at_most: Duration::from_secs(10),
};

/// What each read while lingering takes (on the stack; discarded).
const DRAIN_CHUNK: usize = 8 * 1024;

/// A client connection that closes by lingering (see the module).
pub struct Lingering {
    stream: TcpStream,
    bounds: &'static Bounds,
    /// The client's side has ended (a read returned nothing).
    read_closed: bool,
    /// Our FIN has been sent.
    write_closed: bool,
    /// While lingering: when it stops (pushed back after each read, up to the total bound).
    until: Option<Pin<Box<Sleep>>>,
    /// While lingering: when it must stop whatever the client does.
    hard_stop: Option<Instant>,
}

impl Lingering {
    pub fn new(stream: TcpStream, bounds: &'static Bounds) -> Self {
        Self {
            stream,
            bounds,
            read_closed: false,
            write_closed: false,
            until: None,
            hard_stop: None,
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let asked = buf.remaining() > 0;
        let result = ready!(Pin::new(&mut self.stream).poll_read(cx, buf));
        if result.is_err() || (asked && buf.filled().len() == before) {
            self.read_closed = true;
        }
        Poll::Ready(result)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            this.write_closed = true;
        }
        if this.read_closed {
            return Poll::Ready(Ok(()));
        }
        let now = Instant::now();
        let bounds = this.bounds;
        let hard_stop = *this.hard_stop.get_or_insert(now + bounds.at_most);
        let until = this.until.get_or_insert_with(|| {
            Box::pin(tokio::time::sleep_until(
                (now + bounds.quiet_for).min(hard_stop),
            ))
        });
        let mut scratch = [0u8; DRAIN_CHUNK];
        loop {
            if until.as_mut().poll(cx).is_ready() {
                this.read_closed = true;
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    let next = (Instant::now() + bounds.quiet_for).min(hard_stop);
                    until.as_mut().reset(next);
                }
                // The client closed (or the connection failed): done.
                Poll::Ready(_) => {
                    this.read_closed = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Long enough that a test machine's stalls do not end a linger early.
    static PATIENT: Bounds = Bounds {
        quiet_for: Duration::from_secs(5),
        at_most: Duration::from_secs(10),
    };

    /// A short silence ends it.
    static QUICK_TO_GIVE_UP: Bounds = Bounds {
        quiet_for: Duration::from_millis(300),
        at_most: Duration::from_secs(10),
    };

    /// The total bound ends it, well before any silence would.
    static CUT_SHORT: Bounds = Bounds {
        quiet_for: Duration::from_secs(5),
        at_most: Duration::from_secs(1),
    };

    async fn pair(bounds: &'static Bounds) -> (TcpStream, Lingering) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, Lingering::new(server, bounds))
    }

    /// The server answers without reading what the client sent, and closes while the client
    /// keeps sending: the client reads the whole answer, then the end — no reset.
    #[tokio::test]
    async fn a_client_still_sending_reads_the_answer_then_the_end() {
        let (mut client, mut server) = pair(&PATIENT).await;
        client.write_all(&[b'x'; 64 * 1024]).await.unwrap();
        server.write_all(b"HTTP/1.1 413\r\n\r\n").await.unwrap();
        let closing = tokio::spawn(async move {
            server.shutdown().await.unwrap();
            server.read_closed
        });
        // The client goes on writing for a while after the answer was sent.
        for _ in 0..20 {
            client.write_all(&[b'y'; 16 * 1024]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 413\r\n\r\n");
        drop(client);
        assert!(closing.await.unwrap());
    }

    /// How long closing waits for a client that neither sends nor closes, under `bounds`.
    async fn wait_for_a_silent_client(bounds: &'static Bounds) -> Duration {
        let (_client, mut server) = pair(bounds).await;
        let started = Instant::now();
        server.shutdown().await.unwrap();
        started.elapsed()
    }

    /// A client that never closes holds the connection for `quiet_for` of silence, and never
    /// past `at_most` when that comes first.
    #[tokio::test]
    async fn a_silent_client_is_waited_for_only_so_long() {
        let waited = wait_for_a_silent_client(&QUICK_TO_GIVE_UP).await;
        assert!(waited >= QUICK_TO_GIVE_UP.quiet_for, "{waited:?}");
        assert!(waited < QUICK_TO_GIVE_UP.at_most, "{waited:?}");
        let waited = wait_for_a_silent_client(&CUT_SHORT).await;
        assert!(waited >= CUT_SHORT.at_most, "{waited:?}");
        assert!(waited < CUT_SHORT.quiet_for, "{waited:?}");
    }

    /// A client that keeps sending (every 100 ms, well inside `quiet_for`) is read for
    /// `at_most`, no longer.
    #[tokio::test]
    async fn a_client_that_keeps_sending_is_cut_off() {
        let (mut client, mut server) = pair(&CUT_SHORT).await;
        let started = Instant::now();
        let closing = tokio::spawn(async move { server.shutdown().await });
        while !closing.is_finished() {
            // Ends in an error once the server has gone.
            if client.write_all(b"more").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        closing.await.unwrap().unwrap();
        let waited = started.elapsed();
        assert!(waited >= CUT_SHORT.at_most, "{waited:?}");
        assert!(waited < CUT_SHORT.quiet_for, "{waited:?}");
    }

    /// A client that closed first: nothing to wait for.
    #[tokio::test]
    async fn a_client_that_closed_first_is_not_waited_for() {
        let (client, mut server) = pair(&PATIENT).await;
        drop(client);
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        let started = Instant::now();
        server.shutdown().await.unwrap();
        assert!(started.elapsed() < PATIENT.quiet_for);
    }
}
